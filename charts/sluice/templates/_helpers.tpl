{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.fullname" -}}
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

{{/* "<fullname>-<model>": the model's Service, VirtualService and DestinationRule. */}}
{{- define "sluice.modelName" -}}
{{- printf "%s-%s" (include "sluice.fullname" .root) .model | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<fullname>-<model>-v<N>": one version's Deployment (and its PDB, HPA, ConfigMap). */}}
{{- define "sluice.versionName" -}}
{{- printf "%s-%s-v%d" (include "sluice.fullname" .root) .model (int .version) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.etcdName" -}}
{{- printf "%s-etcd" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.gatewayName" -}}
{{- printf "%s-gateway" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.meshSyncName" -}}
{{- printf "%s-mesh-sync" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The model's Service host name, as Istio and clients inside the cluster use it. */}}
{{- define "sluice.modelHost" -}}
{{- printf "%s.%s.svc.cluster.local" (include "sluice.modelName" .) .root.Release.Namespace -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------------- */}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Images ----------------------------------------------------------------------------------- */}}

{{/* dict "image" <images.X> "root" $ "suffix" "" */}}
{{- define "sluice.image" -}}
{{- $tag := .image.tag | default (printf "%s%s" .root.Chart.AppVersion (.suffix | default "")) -}}
{{- $repository := .image.repository -}}
{{- if .root.Values.images.registry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .root.Values.images.registry) $repository -}}
{{- end -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{- define "sluice.imagePullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* etcd connection ---------------------------------------------------------------------------- */}}

{{- define "sluice.etcdEndpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- printf "%s.%s.svc.cluster.local:2379" (include "sluice.etcdName" .) .Release.Namespace -}}
{{- else -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* SLUICE_ETCD_* environment of every component that talks to etcd. */}}
{{- define "sluice.etcdEnv" -}}
- name: SLUICE_ETCD_ENDPOINTS
  value: {{ include "sluice.etcdEndpoints" . | quote }}
- name: SLUICE_ETCD_PREFIX
  value: {{ .Values.etcd.prefix | quote }}
{{- $external := .Values.etcd.external }}
{{- if and (not .Values.etcd.bundled.enabled) $external.tls.enabled }}
- name: SLUICE_ETCD_CA_CERT
  value: /etc/sluice/etcd-tls/{{ $external.tls.caKey }}
{{- if and $external.tls.certKey $external.tls.keyKey }}
- name: SLUICE_ETCD_CERT
  value: /etc/sluice/etcd-tls/{{ $external.tls.certKey }}
- name: SLUICE_ETCD_KEY
  value: /etc/sluice/etcd-tls/{{ $external.tls.keyKey }}
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.bundled.enabled) $external.auth.enabled }}
- name: SLUICE_ETCD_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $external.auth.existingSecret }}
      key: {{ $external.auth.usernameKey }}
- name: SLUICE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $external.auth.existingSecret }}
      key: {{ $external.auth.passwordKey }}
{{- end }}
{{- end -}}

{{- define "sluice.etcdTlsEnabled" -}}
{{- if and (not .Values.etcd.bundled.enabled) .Values.etcd.external.tls.enabled -}}true{{- end -}}
{{- end -}}

{{- define "sluice.etcdVolumeMounts" -}}
{{- if include "sluice.etcdTlsEnabled" . }}
- name: etcd-tls
  mountPath: /etc/sluice/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sluice.etcdVolumes" -}}
{{- if include "sluice.etcdTlsEnabled" . }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* Checksum of everything that changes how components reach etcd: a change restarts the pods. */}}
{{- define "sluice.etcdChecksum" -}}
{{- toJson (dict "etcd" .Values.etcd "endpoints" (include "sluice.etcdEndpoints" .)) | sha256sum -}}
{{- end -}}

{{/* Per-version settings: modelDefaults, then the model entry, then the version entry. */}}
{{/* dict "root" $ "model" <model entry> "version" <version entry> → YAML of the merged settings */}}
{{- define "sluice.versionSettings" -}}
{{- $defaults := deepCopy .root.Values.modelDefaults -}}
{{- $fromModel := omit (deepCopy .model) "name" "versions" "config" -}}
{{- $fromVersion := omit (deepCopy .version) "version" "weight" -}}
{{- toYaml (mergeOverwrite $defaults $fromModel $fromVersion) -}}
{{- end -}}

{{/* preStop sleep + deregister grace + grace period + a margin for process exit. */}}
{{- define "sluice.terminationGrace" -}}
{{- add (int .preStopSleepSeconds) (int (ceil .deregisterGraceSeconds)) (int (ceil .gracePeriodSeconds)) 10 -}}
{{- end -}}

{{- define "sluice.rolloutControllerName" -}}
{{- printf "%s-rollout-controller" (include "sluice.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
