{{/* The chart's name. */}}
{{- define "npo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object: <release>-npo, or <release> when it already contains the chart's name. */}}
{{- define "npo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object; pass (dict "ctx" $ "component" "learner"). */}}
{{- define "npo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{ include "npo.selectorLabels" . }}
{{- end }}

{{/* Selector labels of one component; pass (dict "ctx" $ "component" "learner"). */}}
{{- define "npo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "npo.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "npo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "npo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: repository:tag; pass (dict "image" .Values.image "fallback" .Values.image "ctx" $). */}}
{{- define "npo.image" -}}
{{- $repo := default .fallback.repository .image.repository }}
{{- $tag := default (default .ctx.Chart.AppVersion .fallback.tag) .image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Object names of the roles. */}}
{{- define "npo.cacheName" -}}{{ include "npo.fullname" . }}-guidance-cache{{- end }}
{{- define "npo.rolloutName" -}}{{ include "npo.fullname" . }}-rollout{{- end }}
{{- define "npo.learnerName" -}}{{ include "npo.fullname" . }}-learner{{- end }}
{{- define "npo.controllerName" -}}{{ include "npo.fullname" . }}-controller{{- end }}
{{- define "npo.redisName" -}}{{ include "npo.fullname" . }}-redis{{- end }}
{{- define "npo.configName" -}}{{ include "npo.fullname" . }}-config{{- end }}
{{- define "npo.dataClaim" -}}{{ default (printf "%s-data" (include "npo.fullname" .)) .Values.persistence.existingClaim }}{{- end }}

{{/* The rollout replicas as the learner and controller take them: host:port,host:port,... (one per replica of the
StatefulSet, addressed through its headless Service). */}}
{{- define "npo.rolloutAddresses" -}}
{{- $name := include "npo.rolloutName" . }}
{{- $addresses := list }}
{{- range $i := until (int .Values.rollout.replicaCount) }}
{{- $addresses = append $addresses (printf "%s-%d.%s.%s.svc.%s:%d" $name $i $name $.Release.Namespace $.Values.clusterDomain (int $.Values.rollout.port)) }}
{{- end }}
{{- join "," $addresses }}
{{- end }}

{{/* The guidance cache service's host:port. */}}
{{- define "npo.cacheAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "npo.cacheName" .) .Release.Namespace .Values.clusterDomain (int .Values.guidanceCache.port) }}
{{- end }}

{{/* The learner's host (its Service). */}}
{{- define "npo.learnerHost" -}}
{{- printf "%s.%s.svc.%s" (include "npo.learnerName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* The learner's run folder on the shared volume. */}}
{{- define "npo.runDir" -}}
{{- default (printf "/data/runs/%s" (include "npo.fullname" .)) .Values.learner.runDir }}
{{- end }}

{{/* The Redis URL of the guidance cache. */}}
{{- define "npo.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:%d/0" (include "npo.redisName" .) (int .Values.redis.port) }}
{{- else }}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* The Secret and key holding the Redis password; empty when Redis needs none. */}}
{{- define "npo.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}{{ default (printf "%s-redis" (include "npo.fullname" .)) .Values.redis.auth.existingSecret }}{{ end }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}
{{- define "npo.redisSecretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}{{ .Values.redis.external.existingSecretKey }}{{ end }}
{{- end }}

{{/* The API token's Secret. */}}
{{- define "npo.tokenSecretName" -}}
{{- default (printf "%s-api-token" (include "npo.fullname" .)) .Values.apiToken.existingSecret }}
{{- end }}

{{/* A value kept across upgrades: the existing Secret's key when there is one, else `value`, else random.
Pass (dict "ctx" $ "secret" NAME "key" KEY "value" VALUE). */}}
{{- define "npo.stableSecret" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- if .value }}
{{- .value | b64enc }}
{{- else if and $existing (index ($existing.data | default dict) .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum 32 | b64enc }}
{{- end }}
{{- end }}

{{/* Learner arguments: with the controller running AutoNPO, the learner trains the plain main line (method=grpo),
as `npo up` does. */}}
{{- define "npo.controllerRunsAutonpo" -}}
{{- $method := default "autonpo" .Values.runConfig.method }}
{{- $controllerCfg := default dict .Values.runConfig.controller }}
{{- $autonpo := true }}
{{- if hasKey $controllerCfg "autonpo" }}{{ $autonpo = $controllerCfg.autonpo }}{{ end }}
{{- if and .Values.controller.enabled (eq (toString $method) "autonpo") $autonpo }}true{{ end }}
{{- end }}

{{/* resources with nvidia.com/gpu added to requests and limits; pass (dict "resources" R "gpus" N). */}}
{{- define "npo.resources" -}}
{{- $resources := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := default dict $resources.limits }}
{{- $requests := default dict $resources.requests }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- $_ := set $resources "requests" $requests }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Scheduling of one role; pass the role's values. */}}
{{- define "npo.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Environment shared by the npo roles. */}}
{{- define "npo.env" -}}
- name: PYTHONUNBUFFERED
  value: "1"
- name: HOME
  value: /tmp
{{- end }}

{{/* Annotations of a role's pods: the config's checksum (a changed run config restarts them) and the extras. */}}
{{- define "npo.podAnnotations" -}}
checksum/config: {{ toYaml .ctx.Values.runConfig | sha256sum }}
{{- with .ctx.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with .role.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}
