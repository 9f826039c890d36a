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
