#!/usr/bin/env bash
# `make audit`: a CycloneDX SBOM of what uv.lock installs, then pip-audit over the same pins.
# The SBOM needs nothing but the lock. The scan asks PyPI's advisory data; when PyPI cannot be
# reached it is skipped with a message rather than failed, so an offline build still gets its
# SBOM. A known vulnerability fails the target.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=.venv/bin
out=reports/audit
mkdir -p "$out"

# The third-party packages the service and its images install (the workspace's own packages
# are not on PyPI, so there is nothing to look up for them).
"$bin/uv" export --frozen --quiet --no-dev --extra embed --no-emit-workspace \
  --format requirements-txt --output-file "$out/requirements.txt"
"$bin/cyclonedx-py" requirements --output-reproducible --of JSON -o "$out/sbom.json" \
  "$out/requirements.txt"
echo "audit: SBOM of $(grep -c '==' "$out/requirements.txt") locked packages in $out/sbom.json"

if ! "$bin/python" - <<'PY'
import sys
import urllib.request

try:
    urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=10).close()
except OSError as error:
    print(f"audit: PyPI unreachable ({error}); skipping the vulnerability scan", file=sys.stderr)
    sys.exit(1)
PY
then
  exit 0
fi
"$bin/pip-audit" --requirement "$out/requirements.txt" --require-hashes --disable-pip \
  --progress-spinner off --format json --output "$out/pip-audit.json" || {
  status=$?
  [ -f "$out/pip-audit.json" ] && "$bin/python" -m json.tool "$out/pip-audit.json" | head -60
  exit "$status"
}
echo "audit: no known vulnerabilities in the locked packages ($out/pip-audit.json)"
