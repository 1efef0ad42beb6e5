{{/* Names */}}
{{- define "frm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "frm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "frm.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "frm.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Name of a component's objects: <fullname>-<component>. Call with (list $ "api"). */}}
{{- define "frm.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "frm.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "frm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "frm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: Helm's recommended set. Call with (list $ "api"). */}}
{{- define "frm.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "frm.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "frm.labels" -}}
{{- include "frm.selectorLabels" . }}
{{- $root := index . 0 }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: {{ include "frm.name" $root }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Images: repository@digest when a digest is set (the tag is then ignored: a digest names one
image, a tag can be moved), else repository:tag with the tag defaulting to the chart's
appVersion. Call with (list $ .Values.api.image).
*/}}
{{- define "frm.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
An environment value as text. Helm reads YAML numbers as floats, so 1000000 would print as
1e+06; whole numbers print as integers instead.
*/}}
{{- define "frm.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* Redis: where it is and which Secret holds its password. */}}
{{- define "frm.redisHost" -}}
{{- include "frm.componentName" (list . "redis") }}
{{- end }}

{{/*
The Service clients bootstrap from: the headless one in standalone mode, and in cluster mode
the redis-client Service, which lists only nodes in a healthy cluster.
*/}}
{{- define "frm.redisClientHost" -}}
{{- if eq .Values.redis.mode "cluster" }}
{{- include "frm.componentName" (list . "redis-client") }}
{{- else }}
{{- include "frm.redisHost" . }}
{{- end }}
{{- end }}

{{/*
That Service's fully qualified name, for consumers in other namespaces (KEDA's operator runs
in its own): a short name only resolves inside the release's namespace.
*/}}
{{- define "frm.redisServiceFqdn" -}}
{{- printf "%s.%s.svc.%s" (include "frm.redisClientHost" .) .Release.Namespace (trimSuffix "." .Values.clusterDomain) }}
{{- end }}

{{/*
Bytes in a Kubernetes quantity ("512Mi", "1G", "268435456") or a Redis size ("200mb", "1gb",
"100m"). Redis reads k/m/g as powers of 1000 and kb/mb/gb as powers of 1024.
*/}}
{{- define "frm.bytes" -}}
{{- $text := toString . }}
{{- $match := regexFind "^[0-9]+(\\.[0-9]+)?" $text }}
{{- if not $match }}{{ fail (printf "%q is not a memory size" $text) }}{{ end }}
{{- $unit := lower (trimPrefix $match $text) }}
{{- $units := dict "" 1 "k" 1000 "m" 1000000 "g" 1000000000 "t" 1000000000000 "ki" 1024 "kb" 1024 "mi" 1048576 "mb" 1048576 "gi" 1073741824 "gb" 1073741824 "ti" 1099511627776 "tb" 1099511627776 }}
{{- if not (hasKey $units $unit) }}{{ fail (printf "%q has a unit the chart does not know" $text) }}{{ end }}
{{- mulf (float64 $match) (index $units $unit) | floor | int64 }}
{{- end }}

{{/*
Redis's maxmemory in bytes: redis.maxmemory when set, else redis.maxmemoryPercent of the
container's memory limit, and at most 75% of it. The rest of the limit is for the copy-on-write pages of the fork
that rewrites the AOF, client buffers and allocator overhead. Without a maxmemory below the
limit, noeviction never applies: the kernel kills Redis instead of Redis refusing writes.
*/}}
{{- define "frm.redisMaxmemory" -}}
{{- $redis := .Values.redis }}
{{- $limit := dig "limits" "memory" "" $redis.resources }}
{{- if not $limit }}
{{- fail "redis.resources.limits.memory is required: maxmemory is derived from it, and without it Redis can grow until the node kills it" }}
{{- end }}
{{- $limitBytes := include "frm.bytes" $limit | int64 }}
{{- $bytes := 0 }}
{{- if $redis.maxmemory }}
{{- $bytes = include "frm.bytes" $redis.maxmemory | int64 }}
{{- else }}
{{- $bytes = div (mul $limitBytes (int64 $redis.maxmemoryPercent)) 100 }}
{{- end }}
{{- /* A quarter of the limit at least stays free: an AOF rewrite forks Redis, and under a
steady write load the copy-on-write pages approach the data's size. */}}
{{- if gt (mul $bytes 100) (mul $limitBytes 75) }}
{{- fail (printf "redis.maxmemory (%v = %d bytes) must be at most 75%% of redis.resources.limits.memory (%v = %d bytes): the rest is for the fork that rewrites the AOF, or the kernel kills Redis before it refuses writes" $redis.maxmemory $bytes $limit $limitBytes) }}
{{- end }}
{{- if le $bytes 0 }}
{{- fail (printf "redis.maxmemory (%v) must be more than 0 bytes" $redis.maxmemory) }}
{{- end }}
{{- $bytes }}
{{- end }}

{{/* "true" when the chart runs Redis itself (redis.mode standalone or cluster). */}}
{{- define "frm.redisDeployed" -}}
{{- if ne .Values.redis.mode "external" }}true{{ end }}
{{- end }}

{{/* Where the api and worker mount externalRedis.tls.caSecret. */}}
{{- define "frm.redisCaDir" -}}/etc/fastapi-redis-mini/redis-ca{{- end }}

{{/*
REDIS_URL. In cluster mode it names the redis-client Service, which lists only nodes in a
healthy cluster: the client discovers the rest of the cluster from whichever answers. An external CA is passed to the client
as the URL's ssl_ca_certs option.
*/}}
{{- define "frm.redisUrl" -}}
{{- if include "frm.redisDeployed" . }}
{{- $user := "" }}
{{- with include "frm.redisUsername" . }}{{ $user = printf "%s@" (urlquery .) }}{{ end }}
{{- printf "redis://%s%s:%d/0" $user (include "frm.redisClientHost" .) (int .Values.redis.port) }}
{{- else }}
{{- $url := required "externalRedis.url is required when redis.mode=external" .Values.externalRedis.url }}
{{- with .Values.externalRedis.tls.caSecret }}
{{- if not (hasPrefix "rediss://" $url) }}
{{- fail (printf "externalRedis.tls.caSecret (%s) needs a rediss:// externalRedis.url" .) }}
{{- end }}
{{- $url = printf "%s%sssl_ca_certs=%s/%s" $url (ternary "&" "?" (contains "?" $url)) (include "frm.redisCaDir" $) $.Values.externalRedis.tls.caKey }}
{{- end }}
{{- $url }}
{{- end }}
{{- end }}

{{- define "frm.redisSecretName" -}}
{{- if include "frm.redisDeployed" . }}
{{- default (include "frm.componentName" (list . "redis")) .Values.redis.auth.existingSecret }}
{{- else }}
{{- required "externalRedis.existingSecret is required when redis.mode=external" .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{/* The external Redis's CA certificate, for the api and worker pods (REDIS_URL's ssl_ca_certs). */}}
{{- define "frm.redisCaMount" -}}
{{- if and (not (include "frm.redisDeployed" .)) .Values.externalRedis.tls.caSecret }}
- name: redis-ca
  mountPath: {{ include "frm.redisCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "frm.redisCaVolume" -}}
{{- if and (not (include "frm.redisDeployed" .)) .Values.externalRedis.tls.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.externalRedis.tls.caSecret }}
    items:
      - key: {{ .Values.externalRedis.tls.caKey }}
        path: {{ .Values.externalRedis.tls.caKey }}
{{- end }}
{{- end }}

{{/* Cluster mode: pod count, and each pod's stable DNS name under the headless Service. */}}
{{- define "frm.redisClusterNodeCount" -}}
{{- mul (int .Values.redis.cluster.masters) (add 1 (int .Values.redis.cluster.replicasPerMaster)) }}
{{- end }}

{{- define "frm.redisPodDomain" -}}
{{- printf "%s.%s.svc.%s" (include "frm.redisHost" .) .Release.Namespace (trimSuffix "." .Values.clusterDomain) }}
{{- end }}

{{/* "host:port host:port ...": every cluster node, as the cluster-bootstrap container dials them. */}}
{{- define "frm.redisClusterNodes" -}}
{{- $nodes := list }}
{{- range $i := until (int (include "frm.redisClusterNodeCount" .)) }}
{{- $nodes = append $nodes (printf "%s-%d.%s:%d" (include "frm.redisHost" $) $i (include "frm.redisPodDomain" $) (int $.Values.redis.port)) }}
{{- end }}
{{- join " " $nodes }}
{{- end }}

{{/*
A generated Redis password, base64-encoded: read back from the live Secret on upgrade,
generated on install. Each is worked out once per render and kept in .Values, so the Secret
and the checksums on the pods that read it agree. Call with (list $ key).
*/}}
{{- define "frm.redisGeneratedSecretValue" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- if not (hasKey $root.Values "frmGeneratedRedisSecret") }}
{{- $_ := set $root.Values "frmGeneratedRedisSecret" dict }}
{{- end }}
{{- $generated := $root.Values.frmGeneratedRedisSecret }}
{{- if not (hasKey $generated $key) }}
{{- $value := randAlphaNum 32 | b64enc }}
{{- with lookup "v1" "Secret" $root.Release.Namespace (include "frm.componentName" (list $root "redis")) }}
{{- with index .data $key }}{{ $value = . }}{{ end }}
{{- end }}
{{- $_ := set $generated $key $value }}
{{- end }}
{{- index $generated $key }}
{{- end }}

{{/* The keys of the Redis Secret: the default user's password, and with redis.acl the
service's and the exporter's users' passwords. */}}
{{- define "frm.redisSecretKeys" -}}
{{- $keys := list .Values.redis.auth.existingSecretPasswordKey }}
{{- if include "frm.redisAclEnabled" . }}
{{- $keys = append $keys .Values.redis.acl.passwordKey }}
{{- if .Values.redis.metrics.enabled }}
{{- $keys = append $keys .Values.redis.acl.exporter.passwordKey }}
{{- end }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{/*
A checksum of the Redis password, for the pod templates of everything that reads it: a new
password rolls Redis, the api and the worker together. A Secret the chart does not render is
read with lookup, so `helm upgrade` after rotating it rolls them too; `helm template` cannot
read it and gives a fixed checksum.
*/}}
{{- define "frm.redisSecretChecksum" -}}
{{- if and (include "frm.redisDeployed" .) (not .Values.redis.auth.existingSecret) }}
{{- $values := list }}
{{- range $key := include "frm.redisSecretKeys" . | fromJsonArray }}
{{- $values = append $values (include "frm.redisGeneratedSecretValue" (list $ $key)) }}
{{- end }}
{{- join "\n" $values | sha256sum }}
{{- else }}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "frm.redisSecretName" .) }}
{{- $data := default (dict) (get $secret "data") }}
{{- $values := list }}
{{- range $key := include "frm.redisSecretKeys" . | fromJsonArray }}
{{- $values = append $values (index $data $key | default "") }}
{{- end }}
{{- join "\n" $values | sha256sum }}
{{- end }}
{{- end }}

{{- define "frm.redisSecretKey" -}}
{{- if include "frm.redisDeployed" . }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/* Pod and container hardening shared by every workload of the chart. */}}
{{- define "frm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "frm.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Env every api and worker container gets: settings from the ConfigMap, the Redis password
(and the webhook signing secrets, when there are some) by reference. */}}
{{- define "frm.appEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "frm.fullname" . }}
env:
  - name: REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "frm.redisSecretName" . }}
        key: {{ include "frm.redisClientSecretKey" . }}
  {{- with .Values.config.webhookSecret.existingSecret }}
  - name: WEBHOOK_SECRET
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.config.webhookSecret.secretKey }}
  {{- end }}
  {{- with .Values.config.webhookKeySecrets.existingSecret }}
  - name: WEBHOOK_KEY_SECRETS
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $.Values.config.webhookKeySecrets.secretKey }}
  {{- end }}
{{- end }}

{{/* Checksums of the user's Secrets that both the api and the worker read. */}}
{{- define "frm.appSecretChecksums" -}}
{{- with .Values.config.webhookSecret.existingSecret }}
checksum/webhook-secret: {{ include "frm.secretChecksum" (list $ . $.Values.config.webhookSecret.secretKey) }}
{{- end }}
{{- with .Values.config.webhookKeySecrets.existingSecret }}
checksum/webhook-key-secrets: {{ include "frm.secretChecksum" (list $ . $.Values.config.webhookKeySecrets.secretKey) }}
{{- end }}
{{- end }}

{{/* The Secret of TENANT_SECRET when the worker needs it too (per-key webhook secrets), else
empty. */}}
{{- define "frm.workerTenantSecret" -}}
{{- if .Values.config.webhookKeySecrets.existingSecret }}
{{- .Values.api.tenantSecret.existingSecret }}
{{- end }}
{{- end }}

{{/* Which autoscaler the worker gets: keda, prometheusAdapter, cpu or none. */}}
{{- define "frm.workerAutoscaler" -}}
{{- $as := .Values.worker.autoscaling }}
{{- if not $as.enabled }}none
{{- else if and $as.keda.enabled $as.prometheusAdapter.enabled }}
{{- fail "enable one of worker.autoscaling.keda and worker.autoscaling.prometheusAdapter, not both" }}
{{- else if $as.keda.enabled }}keda
{{- else if $as.prometheusAdapter.enabled }}prometheusAdapter
{{- else }}cpu
{{- end }}
{{- end }}

{{- define "frm.loadtestEnabled" -}}
{{- if or .Values.loadtest.enabled .Values.loadtest.job.enabled }}true{{ end }}
{{- end }}

{{/* Locust containers: the locustfile from the ConfigMap, the api Service as the target. */}}
{{- define "frm.locustContainer" -}}
{{- $root := index . 0 -}}
image: {{ include "frm.image" (list $root $root.Values.loadtest.image) }}
imagePullPolicy: {{ $root.Values.loadtest.image.pullPolicy }}
env:
  - name: HOME
    value: /tmp
  - name: LOCUST_LOCUSTFILE
    value: /loadtest/locustfile.py
  - name: LOCUST_HOST
    value: {{ printf "http://%s:%v" (include "frm.componentName" (list $root "api")) $root.Values.api.service.port | quote }}
  {{- with $root.Values.loadtest.apiKey.existingSecret }}
  - name: LOCUST_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $root.Values.loadtest.apiKey.secretKey }}
  {{- end }}
resources:
  {{- toYaml $root.Values.loadtest.resources | nindent 2 }}
securityContext:
  {{- include "frm.containerSecurityContext" $root | nindent 2 }}
volumeMounts:
  - name: locustfile
    mountPath: /loadtest
    readOnly: true
  - name: tmp
    mountPath: /tmp
{{- end }}

{{- define "frm.locustVolumes" -}}
- name: locustfile
  configMap:
    name: {{ include "frm.componentName" (list . "locust") }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/* QUEUE_PARTITIONS as the service will use it, or empty when the service decides at start
(an external Redis with config.queuePartitions unset). Mirrors core/redis/keys.py. */}}
{{- define "frm.queuePartitions" -}}
{{- $set := .Values.config.queuePartitions }}
{{- if $set }}{{ int $set }}
{{- else if include "frm.redisIsCluster" . }}
{{- if or .Values.api.submitRatePerKey .Values.api.maxUnfinishedPerKey .Values.api.maxStoredBytesPerKey .Values.config.priorityLanes }}1{{ else }}16{{ end }}
{{- else if eq .Values.redis.mode "standalone" }}1
{{- end }}
{{- end }}

{{/*
Labels of a pod template whose every change restarts a stateful pod: the recommended labels
that stay the same from one chart version to the next (no helm.sh/chart, no version), so a
chart bump alone never restarts Redis. Call with (list $ "redis" extraLabels).
*/}}
{{- define "frm.stablePodLabels" -}}
{{- $root := index . 0 -}}
{{- include "frm.selectorLabels" (list $root (index . 1)) }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: {{ include "frm.name" $root }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- with index . 2 }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Cluster mode: the layout the StatefulSet was created for, kept in an annotation. */}}
{{- define "frm.redisClusterLayout" -}}
{{- printf "%d masters x %d replicas" (int .Values.redis.cluster.masters) (int .Values.redis.cluster.replicasPerMaster) }}
{{- end }}

{{- define "frm.redisLayoutAnnotation" -}}fastapi-redis-mini/cluster-layout{{- end }}

{{/*
Refuse an upgrade that the Redis StatefulSet cannot take, with what to do instead. Call with
(list $ existing), where existing is the live StatefulSet (lookup) or empty: `helm template`
and GitOps renders see nothing, and check nothing.
- Kubernetes forbids changing podManagementPolicy (it differs between standalone and cluster)
  and volumeClaimTemplates (persistence size, storage class, on or off) in place.
- In cluster mode the chart never moves slots: more or fewer pods than the cluster was
  created with would leave new nodes empty or take masters away with their slots.
*/}}
{{- define "frm.redisStatefulSetGuard" -}}
{{- $root := index . 0 }}
{{- $existing := index . 1 }}
{{- if $existing }}
{{- $name := include "frm.componentName" (list $root "redis") }}
{{- $cluster := eq $root.Values.redis.mode "cluster" }}
{{- $policy := dig "spec" "podManagementPolicy" "OrderedReady" $existing }}
{{- if ne $policy (ternary "Parallel" "OrderedReady" $cluster) }}
{{- fail (printf "redis.mode: the StatefulSet %s was created for another redis.mode, and Kubernetes cannot change it in place (podManagementPolicy). A new mode is a new Redis: drain the queue, delete the StatefulSet and its claims (kubectl delete statefulset %s; kubectl delete pvc -l app.kubernetes.io/instance=%s,app.kubernetes.io/component=redis), then upgrade. See the chart README, \"Changes a StatefulSet cannot take\"." $name $name $root.Release.Name) }}
{{- end }}
{{- $claims := dig "spec" "volumeClaimTemplates" (list) $existing }}
{{- $had := "" }}
{{- $hadClass := "" }}
{{- with $claims }}
{{- $claim := first . }}
{{- $had = dig "spec" "resources" "requests" "storage" "" $claim }}
{{- $hadClass = dig "spec" "storageClassName" "" $claim }}
{{- end }}
{{- $persistence := $root.Values.redis.persistence }}
{{- $want := ternary $persistence.size "" $persistence.enabled }}
{{- $wantClass := ternary $persistence.storageClass "" $persistence.enabled }}
{{- if or (ne (toString $had) (toString $want)) (and $wantClass (ne $hadClass $wantClass)) }}
{{- fail (printf "redis.persistence: the StatefulSet %s has claims of %q and these values ask for %q; Kubernetes cannot change volumeClaimTemplates in place. To grow the volumes, resize each claim (kubectl edit pvc, if the StorageClass allows expansion), then kubectl delete statefulset %s --cascade=orphan and upgrade: the pods keep running and are adopted. See the chart README, \"Changes a StatefulSet cannot take\"." $name (default "no claim" (toString $had)) (default "no claim" (toString $want)) $name) }}
{{- end }}
{{- if and $cluster (not $root.Values.redis.cluster.allowLayoutChange) }}
{{- $was := dig "metadata" "annotations" (include "frm.redisLayoutAnnotation" $root) "" $existing }}
{{- $now := include "frm.redisClusterLayout" $root }}
{{- $layoutChanged := false }}
{{- if $was }}
{{- $layoutChanged = ne $was $now }}
{{- else }}
{{- $layoutChanged = ne (int (dig "spec" "replicas" 0 $existing)) (int (include "frm.redisClusterNodeCount" $root)) }}
{{- $was = printf "%v pods" (dig "spec" "replicas" 0 $existing) }}
{{- end }}
{{- if $layoutChanged }}
{{- fail (printf "redis.cluster: the cluster was created with %s and these values ask for %s. The chart never moves hash slots, so new nodes would stay empty and removed masters would take their slots with them. Keep redis.cluster.masters and replicasPerMaster as they were, or follow the chart README, \"Changing the layout\", and upgrade with redis.cluster.allowLayoutChange=true." $was $now) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* This pod's name and address, from the downward API. */}}
{{- define "frm.podIdentityEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/*
A checksum of one key of a Secret the user brings, for the pod templates that read it: a
rotated API key or CA then rolls those pods on `helm upgrade`. `helm template` cannot read
the Secret and gives a fixed checksum. Call with (list $ secretName key).
*/}}
{{- define "frm.secretChecksum" -}}
{{- $root := index . 0 }}
{{- $secret := lookup "v1" "Secret" $root.Release.Namespace (index . 1) }}
{{- index (default (dict) (get $secret "data")) (index . 2) | default "" | sha256sum }}
{{- end }}

{{/* The external Redis's CA checksum annotation, when there is a CA. */}}
{{- define "frm.redisCaChecksum" -}}
{{- if and (not (include "frm.redisDeployed" .)) .Values.externalRedis.tls.caSecret }}
checksum/redis-ca: {{ include "frm.secretChecksum" (list . .Values.externalRedis.tls.caSecret .Values.externalRedis.tls.caKey) }}
{{- end }}
{{- end }}

{{/* The one stream of a single-partition queue, as core/redis/keys.py names it: on a cluster
every key starts with one hash tag. */}}
{{- define "frm.streamKey" -}}
{{- $stream := printf "%s%s" .Values.config.keyPrefix .Values.config.queueKey }}
{{- if include "frm.redisIsCluster" . }}
{{- $stream = printf "{%s}:%s" $stream .Values.config.queueKey }}
{{- end }}
{{- $stream }}
{{- end }}

{{/*
The `stream` label of the api's lag gauge: the stream's key with one partition, the queue's
name (config.queueKey) for the sum over several, and empty when the service decides the
partitions at start (external Redis without config.queuePartitions).
*/}}
{{- define "frm.lagStreamLabel" -}}
{{- $partitions := include "frm.queuePartitions" . }}
{{- if eq $partitions "1" }}
{{- include "frm.streamKey" . }}
{{- else if $partitions }}
{{- .Values.config.queueKey }}
{{- end }}
{{- end }}

{{/* "true" when the queue lives on a Redis Cluster: the chart's (redis.mode=cluster) or an
external one (externalRedis.cluster). */}}
{{- define "frm.redisIsCluster" -}}
{{- if or (eq .Values.redis.mode "cluster") (and (eq .Values.redis.mode "external") .Values.externalRedis.cluster) }}true{{ end }}
{{- end }}

{{/* The user the api, the worker and KEDA reach Redis as: the one in externalRedis.url, the
chart's service user (redis.acl), or nothing (the default user). */}}
{{- define "frm.redisUsername" -}}
{{- if eq .Values.redis.mode "external" }}
{{- with (urlParse .Values.externalRedis.url).userinfo }}{{ (splitList ":" .) | first }}{{ end }}
{{- else if include "frm.redisAclEnabled" . }}
{{- .Values.redis.acl.username }}
{{- end }}
{{- end }}

{{/* "true" when the chart runs Redis with its least-privilege users (redis.acl.enabled). */}}
{{- define "frm.redisAclEnabled" -}}
{{- if and (include "frm.redisDeployed" .) .Values.redis.acl.enabled }}true{{ end }}
{{- end }}

{{/* The key of the password the api, the worker and KEDA use: the service user's with
redis.acl, else the default user's. */}}
{{- define "frm.redisClientSecretKey" -}}
{{- if include "frm.redisAclEnabled" . }}
{{- .Values.redis.acl.passwordKey }}
{{- else }}
{{- include "frm.redisSecretKey" . }}
{{- end }}
{{- end }}

{{/*
One ACL rule per line of a files/redis/*-commands.txt file: `+command` or
`+command|subcommand`, comments and blank lines left out. Call with (list $ "service").
*/}}
{{- define "frm.aclCommands" -}}
{{- $root := index . 0 }}
{{- $rules := list }}
{{- range $line := splitList "\n" ($root.Files.Get (printf "files/redis/%s-commands.txt" (index . 1))) }}
{{- $command := trim $line }}
{{- if and $command (not (hasPrefix "#" $command)) }}
{{- $rules = append $rules (printf "+%s" (lower $command)) }}
{{- end }}
{{- end }}
{{- join " " $rules }}
{{- end }}

{{/*
The service user's ACL, without its password (start-node.sh adds it): the commands of
files/redis/service-commands.txt, on the keys and channels core/redis/keys.py names. With one
partition on a single server they are the task families and the queue's own names under
config.keyPrefix; on a cluster or with partitions, all of them start with a hash tag that
opens with the prefix and the queue's name.
*/}}
{{- define "frm.redisServiceAcl" -}}
{{- $prefix := .Values.config.keyPrefix }}
{{- $queue := printf "%s%s" $prefix .Values.config.queueKey }}
{{- if regexMatch "[*?\\[\\]\\\\\\s]" $queue }}
{{- fail (printf "config.queueKey (%q) must hold no *, ?, [, ], \\ or space while redis.acl.enabled: the service user's key patterns are built from it" .Values.config.queueKey) }}
{{- end }}
{{- $patterns := list }}
{{- range $family := list "task" "cache" "idempotency" "inflight" "quota" "unfinished" "stored" }}
{{- $patterns = append $patterns (printf "~%s%s:*" $prefix $family) }}
{{- end }}
{{- $patterns = concat $patterns (list (printf "~%s" $queue) (printf "~%s:*" $queue) (printf "~{%s}:*" $queue) (printf "~{%s:*" $queue)) }}
{{- $channels := list (printf "&%s:*" $queue) (printf "&{%s}:*" $queue) (printf "&{%s:*" $queue) }}
{{- printf "resetkeys resetchannels %s %s -@all %s" (join " " $patterns) (join " " $channels) (include "frm.aclCommands" (list . "service")) }}
{{- end }}

{{/* The exporter user's ACL: server statistics only, no keys or channels. */}}
{{- define "frm.redisExporterAcl" -}}
{{- printf "resetkeys resetchannels -@all %s" (include "frm.aclCommands" (list . "exporter")) }}
{{- end }}
