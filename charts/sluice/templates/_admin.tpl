{{/*
The admin identity on the metrics (admin) ports of the model services and the gateway controller
(`adminTls`, docs/security.md): HTTPS with the certificate of `adminTls.secretName`, and only
callers presenting a client certificate signed by its admin CA get /metrics or /debug/. The Secret
is mounted as a directory, so a renewed certificate reaches the pod through the kubelet's ..data
swap and is served without a restart. The rollout controller and the ServiceMonitors scrape with
the client certificate of `adminTls.scrapeSecretName`.
*/}}

{{/* Env of a component serving an admin port; "prefix" is its settings' env prefix (SLUICE_, SLUICE_GATEWAY_). */}}
{{- define "sluice.adminTlsEnv" -}}
{{- $a := .root.Values.adminTls -}}
{{- if $a.enabled }}
- name: {{ .prefix }}ADMIN_TLS_CERT
  value: /etc/sluice/admin-tls/tls.crt
- name: {{ .prefix }}ADMIN_TLS_KEY
  value: /etc/sluice/admin-tls/tls.key
- name: {{ .prefix }}ADMIN_TLS_CLIENT_CA
  value: {{ printf "/etc/sluice/admin-tls/%s" $a.clientCaKey | quote }}
{{- end }}
{{- end -}}

{{- define "sluice.adminTlsVolumeMounts" -}}
{{- if .Values.adminTls.enabled }}
- name: admin-tls
  mountPath: /etc/sluice/admin-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sluice.adminTlsVolumes" -}}
{{- if .Values.adminTls.enabled }}
- name: admin-tls
  secret:
    secretName: {{ .Values.adminTls.secretName }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* The rollout controller: scrape the services' /metrics with the admin identity. */}}
{{- define "sluice.adminScrapeEnv" -}}
{{- $a := .Values.adminTls -}}
{{- if $a.enabled }}
- name: SLUICE_ROLLOUT_METRICS_CA
  value: /etc/sluice/admin-scrape/ca.crt
- name: SLUICE_ROLLOUT_METRICS_CERT
  value: /etc/sluice/admin-scrape/tls.crt
- name: SLUICE_ROLLOUT_METRICS_KEY
  value: /etc/sluice/admin-scrape/tls.key
{{- with $a.serverName }}
- name: SLUICE_ROLLOUT_METRICS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "sluice.adminScrapeVolumeMounts" -}}
{{- if .Values.adminTls.enabled }}
- name: admin-scrape
  mountPath: /etc/sluice/admin-scrape
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sluice.adminScrapeVolumes" -}}
{{- if .Values.adminTls.enabled }}
- name: admin-scrape
  secret:
    secretName: {{ .Values.adminTls.scrapeSecretName }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* A ServiceMonitor endpoint's scheme and tlsConfig (Prometheus Operator: Secret references). */}}
{{- define "sluice.adminScrapeTlsConfig" -}}
{{- $a := .Values.adminTls -}}
{{- if $a.enabled }}
scheme: https
tlsConfig:
  ca: {secret: {name: {{ $a.scrapeSecretName }}, key: ca.crt}}
  cert: {secret: {name: {{ $a.scrapeSecretName }}, key: tls.crt}}
  keySecret: {name: {{ $a.scrapeSecretName }}, key: tls.key}
  {{- with $a.serverName }}
  serverName: {{ . | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* One problem per line (sluice.validateValues lists them). */}}
{{- define "sluice.adminTlsProblems" -}}
{{- $a := .Values.adminTls -}}
{{- if $a.enabled }}
{{- if not $a.secretName }}
adminTls.secretName: name the kubernetes.io/tls Secret with the admin ports' certificate (tls.crt, tls.key) and the admin CA ({{ $a.clientCaKey }})
{{- end }}
{{- if and (not $a.scrapeSecretName) (or .Values.rolloutController.enabled .Values.serviceMonitor.enabled) }}
adminTls.scrapeSecretName: the rollout controller and the ServiceMonitors scrape the admin ports: name the kubernetes.io/tls Secret with an admin client certificate (tls.crt, tls.key) and the CA of the admin ports' certificate (ca.crt)
{{- end }}
{{- if and (not $a.serverName) (or .Values.rolloutController.enabled .Values.serviceMonitor.enabled) }}
adminTls.serverName: the rollout controller and the ServiceMonitors check the admin ports' certificate for this name (empty: the pod IP, which the certificate does not name, so every scrape fails): set a DNS name the certificate carries
{{- end }}
{{- end }}
{{- end -}}
