{{/* The chart name, possibly overridden. */}}
{{- define "conserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name: "<release>-conserve", or the release name if it holds the chart name. */}}
{{- define "conserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "conserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "conserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: conserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "conserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's resources; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "conserve.componentLabels" -}}
{{ include "conserve.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Name of one component's resources: "<fullname>-<component>". */}}
{{- define "conserve.componentName" -}}
{{- printf "%s-%s" (include "conserve.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* ServiceAccount name of one component. */}}
{{- define "conserve.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (include "conserve.componentName" .) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/* The ConServe image reference. */}}
{{- define "conserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The kube-scheduler image: the configured tag, else the cluster's version without build metadata. */}}
{{- define "conserve.schedulerImage" -}}
{{- $tag := .Values.scheduler.image.tag }}
{{- if not $tag }}
{{- $tag = regexReplaceAll "[+].*$" .Capabilities.KubeVersion.Version "" }}
{{- end }}
{{- printf "%s:%s" .Values.scheduler.image.repository $tag }}
{{- end }}

{{/* The extender's in-cluster URL, unless scheduler.extender.urlPrefix is set. */}}
{{- define "conserve.extenderURL" -}}
{{- if .Values.scheduler.extender.urlPrefix }}
{{- .Values.scheduler.extender.urlPrefix }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "conserve.componentName" (dict "ctx" . "component" "extender")) .Release.Namespace (int .Values.extender.service.port) }}
{{- end }}
{{- end }}

{{/* The pod-level scheduling fields of one component: nodeSelector, tolerations, affinity, priority class. */}}
{{- define "conserve.podPlacement" -}}
{{- $c := index .ctx.Values .component }}
{{- $nodeSelector := merge (deepCopy $c.nodeSelector) .ctx.Values.nodeSelector }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat .ctx.Values.tolerations $c.tolerations }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The operator's leader-election Lease. */}}
{{- define "conserve.operatorLease" -}}
{{- default (include "conserve.componentName" (dict "ctx" . "component" "operator")) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* The namespace of the router's pool (its Conversations, DecoderPool and servers): router.namespace or the
release namespace. */}}
{{- define "conserve.routerNamespace" -}}
{{- default .Release.Namespace .Values.router.namespace }}
{{- end }}
