{{/*
Names and labels shared by every template. Selectors use only name + instance
(spec.selector is immutable, so never the version or chart labels).
*/}}

{{- define "ps3-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ps3-platform.fullname" -}}
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

{{- define "ps3-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the life of a release. */}}
{{- define "ps3-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ps3-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels on every object; pass a dict with "ctx" and optional "component". */}}
{{- define "ps3-platform.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "ps3-platform.chart" $ctx }}
{{ include "ps3-platform.selectorLabels" $ctx }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: ps3-platform
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels the compiler puts on training pods (platform/ps3_platform/compile/labels.py). */}}
{{- define "ps3-platform.trainingPodSelector" -}}
app.kubernetes.io/part-of: ps3-platform
app.kubernetes.io/component: training
{{- end -}}

{{- define "ps3-platform.operatorName" -}}
{{- printf "%s-training-operator" (include "ps3-platform.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Distinct PriorityClass names the pools refer to, sorted. */}}
{{- define "ps3-platform.poolPriorityClasses" -}}
{{- $names := list -}}
{{- range $name, $pool := .Values.pools -}}
{{- if $pool.priorityClass -}}
{{- $names = append $names $pool.priorityClass -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | sortAlpha | toJson -}}
{{- end -}}

{{/* Prometheus label name kube-state-metrics gives a Kubernetes label key. */}}
{{- define "ps3-platform.ksmLabel" -}}
{{- printf "label_%s" (regexReplaceAll "[^a-zA-Z0-9_]" . "_") -}}
{{- end -}}

{{/* Node label keys the pools select on (for kube-state-metrics' allowlist), sorted. */}}
{{- define "ps3-platform.nodeSelectorKeys" -}}
{{- $keys := list -}}
{{- range $name, $pool := .Values.pools -}}
{{- range $key, $_ := $pool.nodeSelector -}}
{{- $keys = append $keys $key -}}
{{- end -}}
{{- end -}}
{{- $keys | uniq | sortAlpha | join "," -}}
{{- end -}}
