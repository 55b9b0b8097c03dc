{{/*
Every template here takes a context with .Values (this chart's values) and .Release, and
optionally .Chart and .Capabilities: the chart's own root context, or, from another chart that
has this one as a dependency,
  (dict "Values" .Values.cuttle "Release" .Release "Capabilities" .Capabilities)
so that names, checksums and mounts are the same in both (the chart name is the literal
"cuttle", not .Chart.Name, for that reason).
*/}}

{{- define "cuttle.name" -}}
{{- default "cuttle" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cuttle.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "cuttle.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cuttle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cuttle.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cuttle.labels" -}}
{{- if .Chart -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ end -}}
{{ include "cuttle.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
{{- end -}}

{{- define "cuttle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cuttle.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cuttle.image" -}}
{{- $app := "" -}}
{{- if .Chart }}{{ $app = .Chart.AppVersion }}{{ end -}}
{{- $tag := .Values.image.tag | default $app | default "latest" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Where things are mounted. */}}
{{- define "cuttle.configDir" -}}/etc/cuttle/config{{- end -}}
{{- define "cuttle.policyDir" -}}/etc/cuttle/policy{{- end -}}
{{- define "cuttle.tlsDir" -}}/etc/cuttle/tls{{- end -}}

{{- define "cuttle.settingsConfigMapName" -}}{{ include "cuttle.fullname" . }}-config{{- end -}}
{{- define "cuttle.policyConfigMapName" -}}
{{- .Values.policy.existingConfigMap | default (printf "%s-policy" (include "cuttle.fullname" .)) -}}
{{- end -}}

{{- define "cuttle.graceSeconds" -}}
{{- dig "shutdown" "grace_s" 20 (.Values.config.settings | default dict) | int -}}
{{- end -}}

{{/*
proxy.yaml: the values' settings plus what the chart decides (listeners, policy_file, TLS).
*/}}
{{- define "cuttle.settingsYaml" -}}
{{- $s := deepCopy (.Values.config.settings | default dict) -}}
{{- $_ := set $s "listen" (printf "0.0.0.0:%d" (int .Values.ports.client)) -}}
{{- $_ := set $s "admin" (printf "0.0.0.0:%d" (int .Values.ports.admin)) -}}
{{- $_ := set $s "policy_file" (printf "%s/%s" (include "cuttle.policyDir" .) .Values.policy.key) -}}
{{- if .Values.config.tls.existingSecret -}}
{{- $_ := set $s "tls" (dict "cert" (printf "%s/tls.crt" (include "cuttle.tlsDir" .)) "key" (printf "%s/tls.key" (include "cuttle.tlsDir" .))) -}}
{{- end -}}
{{- $_ := unset $s "policy" -}}
# Rendered by the cuttle Helm chart from .Values.config; a change here needs a restart (the
# pod template carries this file's checksum). The policy is in {{ include "cuttle.policyDir" . }} and
# hot-reloads.
{{ toYaml $s }}
{{- end -}}

{{/* Pod template annotation: restart on settings changes only (the policy hot-reloads). */}}
{{- define "cuttle.configChecksum" -}}
{{- include "cuttle.settingsYaml" . | sha256sum -}}
{{- end -}}

{{- define "cuttle.terminationGracePeriodSeconds" -}}
{{- $grace := include "cuttle.graceSeconds" . | int -}}
{{- $sleep := .Values.preStop.sleepSeconds | int -}}
{{- $min := add $grace $sleep -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $min (.Values.terminationGraceMarginSeconds | int) -}}
{{- else -}}
{{- $t := .Values.terminationGracePeriodSeconds | int -}}
{{- if le $t $min -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above shutdown.grace_s + preStop.sleepSeconds (%d + %d): the kubelet would kill the proxy before its drain ends" $t $grace $sleep) -}}
{{- end -}}
{{- $t -}}
{{- end -}}
{{- end -}}

{{/* Checks of values that the schema cannot express; renders nothing. */}}
{{- define "cuttle.validate" -}}
{{- $s := .Values.config.settings | default dict -}}
{{- range $k := list "listen" "admin" "policy" "policy_file" -}}
{{- if hasKey $s $k -}}
{{- fail (printf "config.settings.%s is set by the chart (ports.*, policy.*): remove it" $k) -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $s "tls") .Values.config.tls.existingSecret -}}
{{- fail "config.settings.tls and config.tls.existingSecret are mutually exclusive" -}}
{{- end -}}
{{- $broker := dig "upstream" "broker" "embedded" $s -}}
{{- if eq .Values.mode "edge" -}}
{{- if and (eq $broker "embedded") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) -}}
{{- fail "upstream.broker: embedded gives every replica its own broker (no fan-out or presence across replicas): use one replica, or set config.settings.upstream.broker to a shared broker" -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") .Values.sidecar.demo.enabled (eq $broker "embedded") -}}
{{- fail (printf "sidecar.demo: set config.settings.upstream.broker to mqtt://127.0.0.1:%d (the demo broker in the pod)" (int .Values.sidecar.demo.broker.port)) -}}
{{- end -}}
{{- if and .Values.pdb.enabled (not (kindIs "invalid" .Values.pdb.minAvailable)) (not (kindIs "invalid" .Values.pdb.maxUnavailable)) -}}
{{- fail "pdb: set one of minAvailable and maxUnavailable (the other to null)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage .Values.autoscaling.connections.enabled)) -}}
{{- fail "autoscaling: enable at least one metric (CPU, memory or connections)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.targetCPUUtilizationPercentage (not (dig "requests" "cpu" "" (.Values.resources | default dict))) -}}
{{- fail "autoscaling.targetCPUUtilizationPercentage needs resources.requests.cpu" -}}
{{- end -}}
{{- if and (gt (int .Values.preStop.sleepSeconds) 0) .Capabilities -}}
{{- if not (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "preStop.sleepSeconds uses the native sleep lifecycle action, on by default from Kubernetes 1.30 (this is %s): set preStop.sleepSeconds=0, or enable the PodLifecycleSleepAction feature gate and render with --kube-version 1.30" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
{{- $_ := include "cuttle.terminationGracePeriodSeconds" . -}}
{{- end -}}

{{/* The proxy's container (a mapping, without the list dash). */}}
{{- define "cuttle.container" -}}
name: cuttle
image: {{ include "cuttle.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args: ["run"]
env:
  - name: CUTTLE_CONFIG
    value: {{ include "cuttle.configDir" . }}/proxy.yaml
  {{- range .Values.secretEnv }}
  - name: {{ .name }}
    valueFrom:
      secretKeyRef:
        name: {{ .secretName }}
        key: {{ .key }}
        {{- if hasKey . "optional" }}
        optional: {{ .optional }}
        {{- end }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.envFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: cuttle-ws
    containerPort: {{ .Values.ports.client }}
    protocol: TCP
  - name: cuttle-admin
    containerPort: {{ .Values.ports.admin }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /healthz
    port: cuttle-admin
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /healthz
    port: cuttle-admin
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: cuttle-admin
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- if gt (int .Values.preStop.sleepSeconds) 0 }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ .Values.preStop.sleepSeconds }}
{{- end }}
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  # Directories, never subPath: a ConfigMap update swaps the `..data` symlink, and the proxy
  # watches these directories for it.
  - name: cuttle-config
    mountPath: {{ include "cuttle.configDir" . }}
    readOnly: true
  - name: cuttle-policy
    mountPath: {{ include "cuttle.policyDir" . }}
    readOnly: true
  {{- if .Values.config.tls.existingSecret }}
  - name: cuttle-tls
    mountPath: {{ include "cuttle.tlsDir" . }}
    readOnly: true
  {{- end }}
  - name: cuttle-tmp
    mountPath: /tmp
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/*
For another chart's pod spec: the proxy as a list item of `containers`, or, with
sidecar.native, of `initContainers` (restartPolicy: Always, Kubernetes >= 1.29).
  containers:
    - name: broker …
    {{- include "cuttle.sidecar" (dict "Values" .Values.cuttle "Release" .Release) | nindent 4 }}
*/}}
{{- define "cuttle.sidecar" -}}
{{- include "cuttle.validate" . -}}
- {{ include "cuttle.container" . | nindent 2 | trim }}
{{- if .Values.sidecar.native }}
  restartPolicy: Always
{{- end }}
{{- end -}}

{{/* The volumes the proxy's container mounts, as list items of the pod's `volumes`. */}}
{{- define "cuttle.sidecarVolumes" -}}
- name: cuttle-config
  configMap:
    name: {{ include "cuttle.settingsConfigMapName" . }}
- name: cuttle-policy
  configMap:
    name: {{ include "cuttle.policyConfigMapName" . }}
{{- if .Values.config.tls.existingSecret }}
- name: cuttle-tls
  secret:
    secretName: {{ .Values.config.tls.existingSecret }}
{{- end }}
- name: cuttle-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod annotations, including the settings checksum. */}}
{{- define "cuttle.podAnnotations" -}}
checksum/settings: {{ include "cuttle.configChecksum" . }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
