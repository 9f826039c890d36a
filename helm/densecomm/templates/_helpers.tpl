{{/* Chart name, truncated to the 63 characters Kubernetes allows. */}}
{{- define "densecomm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, unless the release already contains the chart name. */}}
{{- define "densecomm.fullname" -}}
{{- if contains (include "densecomm.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "densecomm.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Standard labels. */}}
{{- define "densecomm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "densecomm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels. */}}
{{- define "densecomm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "densecomm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The four metrics ports, in the order the services take them. */}}
{{- define "densecomm.metricsPorts" -}}
{{- $base := int .Values.service.metricsPort -}}
{{- range $i, $svc := list "relay" "sender" "adapter" "receiver" }}
- name: metrics-{{ $svc }}
  port: {{ add $base $i }}
  targetPort: {{ add $base $i }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* The image: repository:tag, tag defaulting to "<appVersion>-<flavor>" (what the README's docker build tags). */}}
{{- define "densecomm.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) -}}
{{ required "image.repository is required" .Values.image.repository }}:{{ $tag }}
{{- end }}

{{/* Pod-level security: the images run as uid 1000 (user "densecomm"), never root. */}}
{{- define "densecomm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "densecomm.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Environment of every densecomm container. */}}
{{- define "densecomm.env" -}}
- name: HF_HUB_OFFLINE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end }}

{{/* Secret volumes and mounts. role "relay" gets the public TLS and auth secrets; every role gets internal TLS. */}}
{{- define "densecomm.secretMounts" -}}
{{- $relay := eq .role "relay" -}}
{{- with .root.Values }}
{{- if and $relay .tls.existingSecret }}
- name: tls
  mountPath: /etc/densecomm/tls
  readOnly: true
{{- end }}
{{- if and $relay .auth.existingSecret }}
- name: auth
  mountPath: /etc/densecomm/auth
  readOnly: true
{{- end }}
{{- if .internalTls.existingSecret }}
- name: internal-tls
  mountPath: /etc/densecomm/internal-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "densecomm.secretVolumes" -}}
{{- $relay := eq .role "relay" -}}
{{- with .root.Values }}
{{- if and $relay .tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if and $relay .auth.existingSecret }}
- name: auth
  secret:
    secretName: {{ .auth.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- if .internalTls.existingSecret }}
- name: internal-tls
  secret:
    secretName: {{ .internalTls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{/* Ray custom resource that pins a role's actors to its pods (KubeRay rayStartParams wants a quoted JSON string). */}}
{{- define "densecomm.rayResource" -}}
densecomm_{{ . }}
{{- end }}
