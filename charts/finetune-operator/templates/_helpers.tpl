{{/*
Names, labels and the RBAC rules shared by the templates. One template per object lives beside this file.
*/}}

{{/* The chart name, overridable. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: <release>-<chart>, or the release name alone when it already contains the
chart name. Truncated to 63 characters because some names become DNS labels.
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. `component` is added by each template. */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/* Selector labels: immutable in a Deployment, so they never include the version. */}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: a digest pins it; otherwise the tag, defaulting to the chart's appVersion. */}}
{{- define "finetune-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
What values.schema.json cannot say field by field about the "restricted" Pod Security profile: runAsNonRoot and a
seccompProfile may be on the pod or the container, but on one of them. The schema refuses every value that loosens it.
*/}}
{{- define "finetune-operator.restricted" -}}
{{- $pod := .Values.podSecurityContext | default dict }}
{{- $container := .Values.securityContext | default dict }}
{{- if not (or $pod.runAsNonRoot $container.runAsNonRoot) }}
{{- fail "securityContext.runAsNonRoot and podSecurityContext.runAsNonRoot are both unset; expected true on one of them (the restricted Pod Security profile)" }}
{{- end }}
{{- if not (or $pod.seccompProfile $container.seccompProfile) }}
{{- fail "securityContext.seccompProfile and podSecurityContext.seccompProfile are both unset; expected {type: RuntimeDefault} on one of them (the restricted Pod Security profile)" }}
{{- end }}
{{- end }}

{{/* The RayJobs' default trainer image: same release line as the operator unless overridden. */}}
{{- define "finetune-operator.trainerImage" -}}
{{- default (printf "ghcr.io/finetune-operator/trainer:%s" .Chart.AppVersion) .Values.settings.trainerImage }}
{{- end }}

{{/*
The rules the operator needs in every namespace it watches, one rule per resource so that each verb can be
traced to what the operator does with it (docs/platform.md, "RBAC"). No wildcards anywhere.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# FineTuneJobs: the objects it reconciles. No create/update/delete: users own them.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch"]
# Status subresource: the operator writes phase/conditions, and grants patch to each job's trainer Role, which RBAC
# allows only to who holds it (escalation rule).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: true; clusters running the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) only allow that to whoever may update the
# owner's finalizers. Adds no power: `patch` on finetunejobs already reaches metadata.finalizers.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# Every child below is created with an ownerReference to its FineTuneJob: under OwnerReferencesPermissionEnforcement
# that needs `delete` on the child, though the operator never deletes one (the garbage collector does). Children
# are created once and never changed, except the RayJob (mirrored, `spec.suspend` patched); every child is
# read back on a conflict (whose is it?) and at every resync (recreate what is gone).
# The KubeRay RayJob that runs each FineTuneJob; watched to mirror its status back, patched to (un)suspend.
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Kueue's Workload of a queued RayJob: listed (by its job-uid label) and patched (spec.active) to suspend and
# resume the job the way Kueue honours; Kueue un-suspends an admitted RayJob whose spec.suspend anyone else sets.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
# The per-job ConfigMap holding the trainer's configuration (immutable).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "delete"]
# The per-job trainer ServiceAccount.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "delete"]
# The per-job Role (get/patch on that job's status only) and the RoleBinding giving it to the trainer.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles"]
  verbs: ["get", "create", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "create", "delete"]
# The per-job NetworkPolicy admitting ingress to the Ray pods only from the job's own pods and KubeRay.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "delete"]
# Kubernetes Events on FineTuneJobs, posted (never updated) by Kopf through the core API; listed (Warning ones) to
# say why a job's Ray cluster does not come up (KubeRay's FailedToCreateHeadPod: a quota, Pod Security).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# The Ray pods of a job whose cluster does not come up, listed by their ray.io/cluster label to say why.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}

{{/* The metrics Service: a DNS-1035 label like the webhook's, hence the same cut (a long release made it 70 long). */}}
{{- define "finetune-operator.metricsName" -}}
{{- printf "%s-metrics" (include "finetune-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
The admission webhook's names (templates/webhook*.yaml): the Service (a DNS-1035 label, hence the cut), the host
name the API server calls and the certificate names, and the directory where a cert-manager Secret is mounted.
*/}}
{{- define "finetune-operator.webhookName" -}}
{{- printf "%s-webhook" (include "finetune-operator.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "finetune-operator.webhookHost" -}}
{{- printf "%s.%s.svc" (include "finetune-operator.webhookName" .) .Release.Namespace }}
{{- end }}

{{- define "finetune-operator.webhookCertDir" -}}
{{- if and .Values.webhook.enabled .Values.webhook.certManager.enabled }}/etc/finetune-operator/webhook{{ end }}
{{- end }}

{{/*
Whether /metrics reviews tokens: "true" unless metrics.auth is false. Not `default true`, which turns false into true,
and not a bare `.Values.metrics.auth`: an upgrade with --reuse-values from a release before it has no such value, and
secure must stay the default then.
*/}}
{{- define "finetune-operator.metricsAuth" -}}
{{- ne (toString .Values.metrics.auth) "false" -}}
{{- end }}

{{/*
The Secret whose token the ServiceMonitor sends (metrics.serviceMonitor.tokenSecret): the one named, the one the chart
creates, or empty for Prometheus's own token (bearerTokenFile). `default dict`: an upgrade with --reuse-values from a
release before the value has none, and keeps the token it had.
*/}}
{{- define "finetune-operator.metricsTokenSecret" -}}
{{- $token := .Values.metrics.serviceMonitor.tokenSecret | default dict }}
{{- if $token.create }}
{{- default (printf "%s-metrics-token" (include "finetune-operator.fullname" .)) $token.name }}
{{- else }}
{{- $token.name | default "" }}
{{- end }}
{{- end }}

{{/* The ServiceAccount of the token the chart creates (metrics.serviceMonitor.tokenSecret.create). */}}
{{- define "finetune-operator.metricsScraperName" -}}
{{- printf "%s-metrics-scraper" (include "finetune-operator.fullname" .) }}
{{- end }}

{{/*
A Prometheus duration in milliseconds, as a string. values.schema.json admits only runs of [0-9]+(ms|s|m|h) (1m30s,
1500ms), so each value that reaches here is read whole; Prometheus's d, w and y never get this far.
*/}}
{{- define "finetune-operator.durationMs" -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 -}}
{{- $unit := regexReplaceAll "^[0-9]+" . "" -}}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | atoi) (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}
