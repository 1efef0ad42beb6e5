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

{{/* Images: tag defaults to the chart's appVersion. Call with (list $ .Values.api.image). */}}
{{- define "frm.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
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

{{- define "frm.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:%d/0" (include "frm.redisHost" .) (int .Values.redis.port) }}
{{- else }}
{{- required "externalRedis.url is required when redis.enabled=false" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{- define "frm.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- default (include "frm.componentName" (list . "redis")) .Values.redis.auth.existingSecret }}
{{- else }}
{{- required "externalRedis.existingSecret is required when redis.enabled=false" .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "frm.redisSecretKey" -}}
{{- if .Values.redis.enabled }}
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

{{/* Env every api and worker container gets: settings from the ConfigMap, the Redis password by reference. */}}
{{- define "frm.appEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "frm.fullname" . }}
env:
  - name: REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ include "frm.redisSecretName" . }}
        key: {{ include "frm.redisSecretKey" . }}
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
