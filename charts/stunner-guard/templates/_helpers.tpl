{{/*
Names. Every object name is a DNS label (at most 63 characters): the Service name becomes
the <SERVICE>_SERVICE_HOST variable the guard reads, and Kubernetes rejects longer labels.
*/}}

{{- define "stunner-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stunner-guard.fullname" -}}
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

{{/*
"<fullname>-<suffix>", the fullname shortened so that the whole stays within 63 characters.
Usage: include "stunner-guard.suffixedName" (list . "policy")
*/}}
{{- define "stunner-guard.suffixedName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "stunner-guard.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "stunner-guard.serviceName" -}}
{{- include "stunner-guard.fullname" . }}
{{- end }}

{{- define "stunner-guard.policyConfigMapName" -}}
{{- include "stunner-guard.suffixedName" (list . "policy") }}
{{- end }}

{{/*
The TLS Secret. Different names per mode: switching modes must not make Helm adopt a
Secret cert-manager owns, or the other way round.
*/}}
{{- define "stunner-guard.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled }}
{{- include "stunner-guard.suffixedName" (list . "certmanager-tls") }}
{{- else }}
{{- include "stunner-guard.suffixedName" (list . "tls") }}
{{- end }}
{{- end }}

{{- define "stunner-guard.certificateName" -}}
{{- include "stunner-guard.suffixedName" (list . "serving") }}
{{- end }}

{{/*
The DNS names the apiserver may use for the guard Service (the serving certificate's
SANs; same list as webhooks.certs.service_dns_names), one per line.
*/}}
{{- define "stunner-guard.dnsNames" -}}
{{- $svc := include "stunner-guard.serviceName" . }}
{{- $ns := .Release.Namespace }}
{{- printf "%s\n%s.%s\n%s.%s.svc\n%s.%s.svc.%s" $svc $svc $ns $svc $ns $svc $ns .Values.clusterDomain }}
{{- end }}

{{- define "stunner-guard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stunner-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stunner-guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stunner-guard.labels" -}}
helm.sh/chart: {{ include "stunner-guard.chart" . }}
{{ include "stunner-guard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/component: webhook
app.kubernetes.io/part-of: stunner
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "stunner-guard.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The policy file the guard loads (webhooks.settings.load_document): exactly the keys
`rules`, `drain` and `census`, each mirroring the Policy / DrainSettings / CensusSettings
dataclasses (census.leaseName resolved to the Lease's name). The guard rejects unknown
keys, and values.schema.json rejects them before that.
*/}}
{{- define "stunner-guard.policyDocument" -}}
{{- $rules := deepCopy .Values.policy.rules }}
{{- with .Values.policy.allRulesMode }}
{{- $mode := . }}
{{- range $name, $rule := $rules }}
{{- $_ := set $rule "mode" $mode }}
{{- end }}
{{- end }}
{{- $census := deepCopy .Values.census }}
{{- $_ := set $census "leaseName" (include "stunner-guard.censusLeaseName" .) }}
{{- dict "rules" $rules "drain" .Values.policy.drain "census" $census | toYaml }}
{{- end }}

{{/*
The census Lease (leader election among the guard's replicas), in the release namespace.
*/}}
{{- define "stunner-guard.censusLeaseName" -}}
{{- .Values.census.leaseName | default (include "stunner-guard.suffixedName" (list . "census")) }}
{{- end }}

{{- define "stunner-guard.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "stunner-guard.fullname" .) }}
{{- end }}

{{/*
Namespaces never sent to the webhooks: kube-system (never break the control plane) and the
guard's own namespace (the guard must be able to restart even when its webhooks fail
closed), plus webhooks.excludeNamespaces.
*/}}
{{- define "stunner-guard.excludedNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace) .Values.webhooks.excludeNamespaces | uniq | toJson }}
{{- end }}

{{- define "stunner-guard.namespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values: {{ include "stunner-guard.excludedNamespaces" . }}
{{- with .Values.watchNamespaces }}
  - key: kubernetes.io/metadata.name
    operator: In
    values: {{ toJson . }}
{{- end }}
{{- end }}

{{/*
CEL for the webhooks' matchConditions: is `c` a stunnerd container? The same test as the
guard's own webhooks.admission.stunnerd.is_stunnerd (tests/test_chart.py compares them): named
stunner-daemon (operator) or stunnerd, or its image repository ends in "stunnerd", or
command[0] is stunnerd or a path to it. The image regex strips the digest (from the first
"@") and the tag (after the last ":", when no "/" follows it: a registry port is not a tag).
`object` is untyped in webhook matchConditions, so every optional field is guarded with
has(): an evaluation error would apply the failure policy.
https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#matching-requests-matchconditions
*/}}
{{- define "stunner-guard.celIsStunnerd" -}}
c.name in ['stunner-daemon', 'stunnerd'] || (has(c.image) && c.image.matches('^([^@]*stunnerd:[^/:@]*|([^@]*/)?[^/:@]*stunnerd)(@.*)?$')) || (has(c.command) && size(c.command) > 0 && (c.command[0] == 'stunnerd' || c.command[0].endsWith('/stunnerd')))
{{- end }}

{{/*
Settings every webhook shares:
- sideEffects None: the guard changes nothing but the admitted object, so dry-run requests
  (kubectl --dry-run=server) reach it too;
- admissionReviewVersions v1: the only version the guard speaks;
- timeoutSeconds from values: short, the webhook is in the path of every stunnerd change;
- matchPolicy Equivalent: requests for another version of a listed resource (e.g.
  autoscaling/v1 HPAs) are converted to the listed version and sent too, so no API version
  bypasses the guard.
*/}}
{{- define "stunner-guard.webhookCommon" -}}
sideEffects: None
admissionReviewVersions: ["v1"]
timeoutSeconds: {{ .Values.webhooks.timeoutSeconds }}
matchPolicy: Equivalent
{{- end }}

{{/*
gunicorn's graceful timeout: how long the guard keeps held drains after SIGTERM. Derived
from the longest drain the policy lets a stunnerd pod have (its grace period, at most
rules.gracePeriod.max in enforce mode) plus 15 s: the guard answers what is still held 5 s
before this, and a drain ends marginSeconds before its pod's deadline.
*/}}
{{- define "stunner-guard.gracefulTimeout" -}}
{{- $set := int .Values.shutdown.gracefulTimeoutSeconds -}}
{{- $max := 14400 -}}
{{- with .Values.policy.rules.gracePeriod }}{{ with .max }}{{ $max = int . }}{{ end }}{{ end -}}
{{- if $set }}{{ $set }}{{ else }}{{ add $max 15 }}{{ end -}}
{{- end }}

{{/*
The guard pod's terminationGracePeriodSeconds: the preStop sleep, then the graceful timeout,
then 10 s for the process to exit before kubelet's SIGKILL.
*/}}
{{- define "stunner-guard.terminationGracePeriod" -}}
{{- $needed := add (int .Values.shutdown.endpointDelaySeconds) (include "stunner-guard.gracefulTimeout" . | int) 10 -}}
{{- $set := int .Values.terminationGracePeriodSeconds -}}
{{- if and $set (lt $set (int $needed)) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must cover shutdown.endpointDelaySeconds + the graceful timeout + 10 (%d): kubelet would kill the guard while it still holds drains" $set (int $needed)) -}}
{{- end -}}
{{- if $set }}{{ $set }}{{ else }}{{ $needed }}{{ end -}}
{{- end }}

{{/* The label the guard stamps on every stunnerd pod it admits (webhooks/names.py). */}}
{{- define "stunner-guard.drainTokenLabel" -}}
stunner-guard.l7mp.io/drain-token
{{- end }}
