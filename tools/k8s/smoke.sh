#!/usr/bin/env bash
# make smoke: check a release of the chart end to end on the current kube context.
#
#   1. install the chart, or use the release that is already there
#   2. helm test
#   3. submit SMOKE_TASKS tasks through a port-forward to the api Service
#   4. run the in-cluster Locust load (the chart's headless Job)
#   5. wait until the worker's ScaledObject (or HPA) is Ready and the worker has more
#      replicas than its minimum
#   6. check that every accepted task is DONE, with lag 0, nothing pending, no dead letters
#   7. print a one-screen report, and remove what it created
#
# Every command is printed before it runs ("+ ..."), so each step can be followed and rerun
# by hand. docs/kubernetes.md ("The smoke test") explains the report.
#
# Settings (environment):
#   SMOKE_RELEASE, SMOKE_NAMESPACE  the release to check (frm-smoke in frm-smoke; `make smoke`
#                                   passes the one `make deploy` installs). When it is missing
#                                   it is installed from SMOKE_CHART with SMOKE_INSTALL_ARGS,
#                                   which must name images the cluster holds (api.image.*,
#                                   worker.image.*); a namespace that existed before is kept
#   SMOKE_TASKS                     tasks submitted through the port-forward (20)
#   SMOKE_USERS, SMOKE_RUN_TIME     the Locust run (50 users for 2m)
#   SMOKE_API_KEY                   sent as a bearer token, when the api requires keys
#   SMOKE_LOCAL_PORT                local end of the port-forward (18000)
#   SMOKE_WAIT_SECONDS              how long each wait may last (300)
set -euo pipefail

# ${var@Q} and empty arrays under `set -u` need bash 4.4; macOS ships 3.2 as /bin/bash.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "make smoke needs bash 4.4 or later, not ${BASH_VERSION} (on macOS: brew install bash)" >&2
    exit 2
fi

CHART=${SMOKE_CHART:-charts/fastapi-redis-mini}
RELEASE=${SMOKE_RELEASE:-frm-smoke}
NAMESPACE=${SMOKE_NAMESPACE:-frm-smoke}
TASKS=${SMOKE_TASKS:-20}
USERS=${SMOKE_USERS:-50}
RUN_TIME=${SMOKE_RUN_TIME:-2m}
API_KEY=${SMOKE_API_KEY:-}
LOCAL_PORT=${SMOKE_LOCAL_PORT:-18000}
WAIT_SECONDS=${SMOKE_WAIT_SECONDS:-300}
POLL_SECONDS=${SMOKE_POLL_SECONDS:-5}
read -r -a INSTALL_ARGS <<<"${SMOKE_INSTALL_ARGS:-}"

API="http://127.0.0.1:${LOCAL_PORT}"
SELECTOR="app.kubernetes.io/instance=${RELEASE}"
WORK=$(mktemp -d)
INSTALLED=0
CREATED_NAMESPACE=0
REVISION_BEFORE_LOAD=""
PORT_FORWARD_PID=""
FAILED=0
REPORT=()

# Commands are printed on the terminal's stderr (fd 3), so neither a captured output nor a
# silenced error hides them.
exec 3>&2

# Print a command the way a shell would take it back. One write per line, so a command
# running in the background cannot split another's line.
trace() {
    local line="+" arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            line+=" $arg"
        else
            line+=" ${arg@Q}"
        fi
    done
    printf '%s\n' "$line" >&3
}

# Print a command, then run it.
run() {
    trace "$@"
    "$@"
}

result() {
    local status=$1 step=$2 detail=$3
    REPORT+=("$(printf '%-4s  %-14s  %s' "$status" "$step" "$detail")")
    if [[ $status != PASS ]]; then
        FAILED=1
    fi
}

kube() {
    run kubectl -n "$NAMESPACE" "$@"
}

# One field of the first object matching the release's labels, or nothing.
field() {
    local kind=$1 labels=$2 path=$3
    kube get "$kind" -l "$labels" -o "jsonpath={.items[0]${path}}" 2>/dev/null || true
}

call_api() {
    local method=$1 path=$2
    shift 2
    local auth=()
    if [[ -n $API_KEY ]]; then
        auth=(-H "Authorization: Bearer ${API_KEY}")
    fi
    run curl -fsS --max-time 40 -X "$method" "${auth[@]}" "$@" "${API}${path}"
}

start_port_forward() {
    stop_port_forward
    local service port
    service=$(field svc "${SELECTOR},app.kubernetes.io/component=api" '.metadata.name')
    port=$(field svc "${SELECTOR},app.kubernetes.io/component=api" '.spec.ports[0].port')
    if [[ -z $service ]]; then
        return 1
    fi
    # Started directly, not through run: `run ... &` would fork a subshell, $! would be that
    # subshell, and killing it would leave kubectl forwarding after the script ends.
    trace kubectl -n "$NAMESPACE" port-forward "svc/${service}" "${LOCAL_PORT}:${port}"
    kubectl -n "$NAMESPACE" port-forward "svc/${service}" "${LOCAL_PORT}:${port}" \
        >"${WORK}/port-forward.log" 2>&1 &
    PORT_FORWARD_PID=$!
    local tries
    for ((tries = 0; tries < 30; tries++)); do
        if call_api GET /healthz >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    return 1
}

stop_port_forward() {
    if [[ -n $PORT_FORWARD_PID ]]; then
        run kill "$PORT_FORWARD_PID" 2>/dev/null || true
        wait "$PORT_FORWARD_PID" 2>/dev/null || true
        PORT_FORWARD_PID=""
    fi
}

# shellcheck disable=SC2317  # run by the EXIT trap, which shellcheck does not follow
cleanup() {
    stop_port_forward
    if ((INSTALLED)); then
        run helm uninstall "$RELEASE" -n "$NAMESPACE" --wait || true
        # The Redis Secret outlives helm uninstall (resource-policy keep): a namespace this
        # script created goes, and in one that was there before only that Secret is removed.
        if ((CREATED_NAMESPACE)); then
            run kubectl delete namespace "$NAMESPACE" --wait=false || true
        else
            kube delete secret -l "${SELECTOR},app.kubernetes.io/component=redis" || true
        fi
    elif [[ -n $REVISION_BEFORE_LOAD ]]; then
        run helm rollback "$RELEASE" "$REVISION_BEFORE_LOAD" -n "$NAMESPACE" --wait || true
        kube delete job -l "${SELECTOR},app.kubernetes.io/component=locust-job" || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

print_report() {
    local context
    context=$(run kubectl config current-context 2>/dev/null || echo unknown)
    printf '\n== smoke: release %s in namespace %s, context %s\n' "$RELEASE" "$NAMESPACE" "$context"
    printf '%s\n' "${REPORT[@]}"
    if ((FAILED)); then
        printf '== FAILED: see the lines above and docs/kubernetes.md, "The smoke test"\n'
    else
        printf '== all checks passed\n'
    fi
}

# Whether SMOKE_INSTALL_ARGS says which images to run: the chart's default images are in no
# registry, and an install without them only ends in ImagePullBackOff after the whole wait.
names_images() {
    local args=" ${INSTALL_ARGS[*]} "
    [[ $args == *" -f "* || $args == *" --values"* ]] ||
        [[ $args == *"api.image."* && $args == *"worker.image."* ]]
}

# -- 1. the release ---------------------------------------------------------------------
run kubectl config current-context
if run helm status "$RELEASE" -n "$NAMESPACE" >/dev/null 2>&1; then
    result PASS release "using the existing release"
elif ! names_images; then
    result FAIL release "no release ${RELEASE} in ${NAMESPACE}: run make deploy (builds, loads and installs the images), or set SMOKE_INSTALL_ARGS to api.image.* and worker.image.* the cluster can pull"
    print_report
    exit 1
else
    if ! run kubectl get namespace "$NAMESPACE" >/dev/null 2>&1; then
        CREATED_NAMESPACE=1
    fi
    if run helm install "$RELEASE" "$CHART" -n "$NAMESPACE" --create-namespace \
        --wait --timeout "${WAIT_SECONDS}s" "${INSTALL_ARGS[@]}"; then
        INSTALLED=1
        result PASS release "installed from ${CHART}"
    else
        INSTALLED=1
        result FAIL release "helm install failed (kubectl -n ${NAMESPACE} get pods shows why)"
        print_report
        exit 1
    fi
fi

# -- 2. helm test -----------------------------------------------------------------------
if run helm test "$RELEASE" -n "$NAMESPACE" --timeout "${WAIT_SECONDS}s"; then
    result PASS "helm test" "a task went through the api Service to DONE"
else
    result FAIL "helm test" "the test pod's task did not reach DONE (kubectl -n ${NAMESPACE} logs -l app.kubernetes.io/component=test)"
fi

# -- 3. tasks through a port-forward ------------------------------------------------------
: >"${WORK}/task-ids"
if start_port_forward; then
    run_id=$(date +%s)
    for ((n = 1; n <= TASKS; n++)); do
        body="{\"prompt\": \"smoke ${n}\", \"params\": {\"duration\": 0.5, \"nonce\": \"${run_id}-${n}\"}}"
        if answer=$(call_api POST /tasks -H 'Content-Type: application/json' -d "$body"); then
            sed -n 's/.*"task_id": *"\([^"]*\)".*/\1/p' <<<"$answer" >>"${WORK}/task-ids"
        fi
    done
    accepted=$(wc -l <"${WORK}/task-ids" | tr -d ' ')
    if ((accepted == TASKS)); then
        result PASS submit "${accepted} of ${TASKS} tasks accepted"
    else
        result FAIL submit "${accepted} of ${TASKS} tasks accepted (the curl errors above say why)"
    fi
else
    result FAIL submit "no port-forward to the api Service (${WORK}/port-forward.log)"
fi
stop_port_forward

# -- 4. and 5. the Locust load, and the worker scaling out under it ------------------------
REVISION_BEFORE_LOAD=$(run helm history "$RELEASE" -n "$NAMESPACE" --max 1 -o yaml |
    sed -n 's/^ *revision: *\([0-9][0-9]*\).*/\1/p' | tail -n 1)
run helm upgrade "$RELEASE" "$CHART" -n "$NAMESPACE" --reuse-values \
    --set loadtest.job.enabled=true --set loadtest.job.users="$USERS" \
    --set loadtest.job.runTime="$RUN_TIME" --timeout "${WAIT_SECONDS}s" \
    >"${WORK}/load.log" 2>&1 &
load_pid=$!

worker="${SELECTOR},app.kubernetes.io/component=worker"
scaler="" ready="" message="" minimum="" most=0
deadline=$((SECONDS + WAIT_SECONDS))
while ((SECONDS < deadline)); do
    if [[ -n $(field scaledobject "$worker" '.metadata.name') ]]; then
        scaler=ScaledObject
        ready=$(field scaledobject "$worker" '.status.conditions[?(@.type=="Ready")].status')
        message=$(field scaledobject "$worker" '.status.conditions[?(@.type=="Ready")].message')
        minimum=$(field scaledobject "$worker" '.spec.minReplicaCount')
    elif [[ -n $(field hpa "$worker" '.metadata.name') ]]; then
        scaler=HorizontalPodAutoscaler
        ready=$(field hpa "$worker" '.status.conditions[?(@.type=="ScalingActive")].status')
        message=$(field hpa "$worker" '.status.conditions[?(@.type=="ScalingActive")].message')
        minimum=$(field hpa "$worker" '.spec.minReplicas')
    fi
    replicas=$(field deployment "$worker" '.status.readyReplicas')
    if ((${replicas:-0} > most)); then
        most=${replicas:-0}
    fi
    if [[ $ready == True ]] && ((most > ${minimum:-1})); then
        break
    fi
    if ! kill -0 "$load_pid" 2>/dev/null; then
        break # the load is over; more waiting would not scale the worker out
    fi
    sleep "$POLL_SECONDS"
done
if [[ -z $scaler ]]; then
    result FAIL autoscaler "the worker has neither a ScaledObject nor an HPA (worker.autoscaling.enabled)"
elif [[ $ready != True ]]; then
    result FAIL autoscaler "${scaler} not Ready: ${message:-no condition reported}"
elif ((most <= ${minimum:-1})); then
    result FAIL autoscaler "${scaler} Ready, but the worker stayed at ${most} replicas (min ${minimum})"
else
    result PASS autoscaler "${scaler} Ready; the worker scaled out to ${most} (min ${minimum})"
fi

if wait "$load_pid"; then
    load_status=0
else
    load_status=$?
fi
job=$(field job "${SELECTOR},app.kubernetes.io/component=locust-job" '.metadata.name')
succeeded=$(field job "${SELECTOR},app.kubernetes.io/component=locust-job" '.status.succeeded')
if [[ -n $job ]]; then
    kube logs "job/${job}" --tail 15 || true
fi
if ((load_status == 0)) && [[ $succeeded == 1 ]]; then
    result PASS locust "job ${job}: ${USERS} users for ${RUN_TIME}, no failed request"
else
    result FAIL locust "the Locust job did not succeed (${WORK}/load.log: $(tail -n 1 "${WORK}/load.log" 2>/dev/null))"
fi

# -- 6. every accepted task DONE, and the queue drained ----------------------------------
if start_port_forward; then
    done_count=0 other=""
    while read -r task_id; do
        status=$(call_api GET "/tasks/${task_id}?wait=30" | sed -n 's/.*"status": *"\([A-Z]*\)".*/\1/p') || true
        if [[ $status == DONE ]]; then
            done_count=$((done_count + 1))
        else
            other="${other} ${task_id}=${status:-unreadable}"
        fi
    done <"${WORK}/task-ids"
    accepted=$(wc -l <"${WORK}/task-ids" | tr -d ' ')
    if ((done_count == accepted)) && ((accepted > 0)); then
        result PASS "tasks done" "${done_count} of ${accepted} accepted tasks DONE"
    else
        result FAIL "tasks done" "${done_count} of ${accepted} DONE; not DONE:${other:- none accepted}"
    fi

    lag="" pending="" dead=""
    deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        metrics=$(call_api GET /metrics || true)
        lag=$(awk '/^fastapi_redis_mini_stream_lag\{/ {print $2; exit}' <<<"$metrics")
        pending=$(awk '/^fastapi_redis_mini_stream_pending\{/ {print $2; exit}' <<<"$metrics")
        dead=$(awk '/^fastapi_redis_mini_dead_letter_length\{/ {print $2; exit}' <<<"$metrics")
        if [[ ${lag%.0} == 0 && ${pending%.0} == 0 ]]; then
            break
        fi
        sleep "$POLL_SECONDS"
    done
    if [[ ${lag%.0} == 0 && ${pending%.0} == 0 && ${dead%.0} == 0 ]]; then
        result PASS queue "lag 0, pending 0, dead letters 0"
    else
        result FAIL queue "lag ${lag:-unread}, pending ${pending:-unread}, dead letters ${dead:-unread}"
    fi
else
    result FAIL "tasks done" "no port-forward to the api Service (${WORK}/port-forward.log)"
fi

# -- 7. the report (cleanup runs on exit) ---------------------------------------------------
print_report
exit "$FAILED"
