{{/* Names, labels and shared pod pieces for the CineSR chart. */}}

{{- define "cinesr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name, at most 63 characters (DNS label). */}}
{{- define "cinesr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: <fullname>-<component>, trimmed to 63 characters. */}}
{{- define "cinesr.componentName" -}}
{{- printf "%s-%s" (include "cinesr.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cinesr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels on every object. */}}
{{- define "cinesr.labels" -}}
helm.sh/chart: {{ include "cinesr.chart" . }}
{{ include "cinesr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cinesr
{{- end -}}

{{- define "cinesr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cinesr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component; call with (dict "root" $ "component" "gateway"). */}}
{{- define "cinesr.componentLabels" -}}
{{ include "cinesr.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cinesr.componentSelectorLabels" -}}
{{ include "cinesr.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cinesr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cinesr.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag or repository@digest; call with (dict "image" .Values.x.image "root" $). */}}
{{- define "cinesr.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* ---- Secrets ---- */}}

{{- define "cinesr.secretName" -}}
{{- include "cinesr.fullname" . -}}
{{- end -}}

{{- define "cinesr.apiTokensSecretName" -}}
{{- default (include "cinesr.secretName" .) .Values.apiTokens.existingSecret -}}
{{- end -}}

{{- define "cinesr.apiTokensSecretKey" -}}
{{- if .Values.apiTokens.existingSecret -}}{{ .Values.apiTokens.existingSecretKey }}{{- else -}}api-tokens{{- end -}}
{{- end -}}

{{- define "cinesr.redisSecretName" -}}
{{- default (include "cinesr.secretName" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "cinesr.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretPasswordKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{/*
A value kept across upgrades: the one in the release's existing Secret when there is one (lookup;
empty offline and on first install), else a fresh random one. Call with
(dict "root" $ "key" "redis-password" "length" 32).
*/}}
{{- define "cinesr.persistentRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "cinesr.secretName" .root) -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}

{{/* ---- Broker ---- */}}

{{- define "cinesr.redisHost" -}}
{{- if .Values.redis.enabled -}}
{{- include "cinesr.componentName" (dict "root" . "component" "redis") -}}
{{- else -}}
{{- required "redis.external.host is required when redis.enabled is false" .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "cinesr.redisPort" -}}
{{- if .Values.redis.enabled -}}6379{{- else -}}{{ .Values.redis.external.port }}{{- end -}}
{{- end -}}

{{/*
Environment for the broker: the password comes from the Secret and is spliced into the URL by
Kubernetes' $(VAR) expansion, so it never appears in the ConfigMap or the pod spec.
*/}}
{{- define "cinesr.brokerEnv" -}}
{{- $scheme := ternary "rediss" "redis" (and (not .Values.redis.enabled) .Values.redis.external.tls) -}}
{{- $hostPort := printf "%s:%s" (include "cinesr.redisHost" .) (include "cinesr.redisPort" .) -}}
{{- if .Values.redis.auth.enabled }}
- name: CINESR_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cinesr.redisSecretName" . }}
      key: {{ include "cinesr.redisSecretKey" . }}
- name: CINESR_BROKER_URL
  value: {{ printf "%s://:$(CINESR_REDIS_PASSWORD)@%s/%d" $scheme $hostPort (int .Values.redis.db) | quote }}
{{- else }}
- name: CINESR_BROKER_URL
  value: {{ printf "%s://%s/%d" $scheme $hostPort (int .Values.redis.db) | quote }}
{{- end }}
{{- end -}}

{{/*
Environment for DICOMweb credentials (the PACS by URL, DICOMweb destinations), from the release's Secret or
the one named by dicomwebAuth.existingSecret (keys absent there are left unset).
*/}}
{{- define "cinesr.dicomwebEnv" -}}
{{- $web := .Values.dicomwebAuth -}}
{{- $env := dict "CINESR_PACS_DICOMWEB_USER" (list $web.usernameKey "dicomweb-username" $web.username) "CINESR_PACS_DICOMWEB_PASSWORD" (list $web.passwordKey "dicomweb-password" $web.password) "CINESR_PACS_DICOMWEB_TOKEN" (list $web.tokenKey "dicomweb-token" $web.token) "CINESR_DICOMWEB_CREDENTIALS" (list $web.destinationCredentialsKey "dicomweb-destination-credentials" $web.destinationCredentials) -}}
{{- range $name := keys $env | sortAlpha }}
{{- $spec := get $env $name }}
{{- if $web.existingSecret }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $web.existingSecret }}
      key: {{ index $spec 0 }}
      optional: true
{{- else if index $spec 2 }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "cinesr.secretName" $ }}
      key: {{ index $spec 1 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ---- Shared pod pieces ---- */}}

{{- define "cinesr.dataClaimName" -}}
{{- default (include "cinesr.componentName" (dict "root" . "component" "data")) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* Rolls pods when settings or generated secrets change. */}}
{{- define "cinesr.checksumAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{- define "cinesr.modelVolumeMount" -}}
{{- if .Values.model.existingClaim }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
  {{- with .Values.model.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "cinesr.modelVolume" -}}
{{- if .Values.model.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Worker grace period must outlast the hard task limit, or SIGKILL cuts running jobs. */}}
{{- define "cinesr.checkGracePeriod" -}}
{{- if le (int .Values.worker.terminationGracePeriodSeconds) (int .Values.config.taskTimeLimit) -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%d) must exceed config.taskTimeLimit (%d)" (int .Values.worker.terminationGracePeriodSeconds) (int .Values.config.taskTimeLimit)) -}}
{{- end -}}
{{- if lt (int .Values.config.taskTimeLimit) (int .Values.config.taskSoftTimeLimit) -}}
{{- fail "config.taskTimeLimit must be at least config.taskSoftTimeLimit" -}}
{{- end -}}
{{- end -}}
