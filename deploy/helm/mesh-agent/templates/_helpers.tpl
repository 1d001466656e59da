{{/* The chart's name, e.g. for labels. */}}
{{- define "mesh-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The objects' name: the chart's name alone, as one agent runs per cluster. */}}
{{- define "mesh-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- include "mesh-agent.name" . -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. No release-specific label, so that the plain manifests
     rendered from the chart stay the same from one render to the next. */}}
{{- define "mesh-agent.labels" -}}
{{ include "mesh-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mesh-agent
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The DaemonSet's selector: never changes once installed. */}}
{{- define "mesh-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mesh-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mesh-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The address the kubelet's probes ask: the admin host, or loopback when it binds all
     addresses (the pod shares the node's network namespace with the kubelet). */}}
{{- define "mesh-agent.probeHost" -}}
{{- if eq .Values.admin.host "0.0.0.0" -}}127.0.0.1{{- else -}}{{ .Values.admin.host }}{{- end -}}
{{- end -}}

{{/* The embedded CA's Service (identity.ca.listen.service). */}}
{{- define "mesh-agent.caService" -}}
{{- printf "%s-ca" (include "mesh-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* --ca-server-names of the CA's TLS endpoint: the node's address and name (expanded by
     the kubelet from env vars declared before), the Service's names, and the operator's. */}}
{{- define "mesh-agent.caServerNames" -}}
{{- $names := list "$(HOST_IP)" "$(MESH_NODE_NAME)" -}}
{{- if .Values.identity.ca.listen.service -}}
{{- $svc := include "mesh-agent.caService" . -}}
{{- $names = append $names (printf "%s.%s.svc" $svc .Release.Namespace) -}}
{{- $names = append $names (printf "%s.%s" $svc .Release.Namespace) -}}
{{- end -}}
{{- join "," (concat $names .Values.identity.ca.listen.serverNames) -}}
{{- end -}}
