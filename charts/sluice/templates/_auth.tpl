{{/*
Authentication and TLS of the gateway (mode gateway), from .Values.gateway.tls and .Values.auth.jwt.
The controller reads the files and hands Envoy their contents (SDS secrets, an inline JWKS), so the
Secrets are mounted into the controller only, as files: a renewed Secret (cert-manager) reaches the
running pod through the kubelet's `..data` swap and the controller's file watch, no restart.
*/}}

{{- define "sluice.gatewayTlsDir" -}}/etc/sluice/gateway-tls{{- end -}}
{{- define "sluice.jwksDir" -}}/etc/sluice/jwks{{- end -}}

{{/* SLUICE_GATEWAY_* environment of the controller for TLS and JWT. */}}
{{- define "sluice.gatewayAuthEnv" -}}
{{- $tls := .Values.gateway.tls -}}
{{- $jwt := .Values.auth.jwt -}}
{{- if $tls.enabled }}
- name: SLUICE_GATEWAY_TLS_CERT
  value: {{ printf "%s/tls.crt" (include "sluice.gatewayTlsDir" .) }}
- name: SLUICE_GATEWAY_TLS_KEY
  value: {{ printf "%s/tls.key" (include "sluice.gatewayTlsDir" .) }}
{{- if $tls.requireClientCertificate }}
- name: SLUICE_GATEWAY_TLS_CLIENT_CA
  value: {{ printf "%s/ca.crt" (include "sluice.gatewayTlsDir" .) }}
{{- end }}
{{- end }}
{{- if $jwt.enabled }}
- name: SLUICE_GATEWAY_JWT_ISSUER
  value: {{ $jwt.issuer | quote }}
{{- with $jwt.audiences }}
- name: SLUICE_GATEWAY_JWT_AUDIENCES
  value: {{ join "," . | quote }}
{{- end }}
{{- if $jwt.jwks.secretName }}
- name: SLUICE_GATEWAY_JWT_JWKS
  value: {{ printf "%s/%s" (include "sluice.jwksDir" .) $jwt.jwks.secretKey | quote }}
{{- else }}
- name: SLUICE_GATEWAY_JWT_JWKS_URI
  value: {{ $jwt.jwks.uri | quote }}
{{- end }}
{{- $pairs := list }}
{{- range $claim, $header := $jwt.claimHeaders }}
{{- $pairs = append $pairs (printf "%s=%s" $claim $header) }}
{{- end }}
- name: SLUICE_GATEWAY_JWT_CLAIM_HEADERS
  value: {{ join "," $pairs | quote }}
- name: SLUICE_GATEWAY_ACCESS_CLAIM
  value: {{ $jwt.accessClaim | quote }}
- name: SLUICE_GATEWAY_ADMIN_CLAIM
  value: {{ $jwt.adminClaim | quote }}
{{- end }}
{{- end -}}

{{- define "sluice.gatewayAuthVolumeMounts" -}}
{{- if .Values.gateway.tls.enabled }}
- name: gateway-tls
  mountPath: {{ include "sluice.gatewayTlsDir" . }}
  readOnly: true
{{- end }}
{{- if and .Values.auth.jwt.enabled .Values.auth.jwt.jwks.secretName }}
- name: jwks
  mountPath: {{ include "sluice.jwksDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sluice.gatewayAuthVolumes" -}}
{{- if .Values.gateway.tls.enabled }}
- name: gateway-tls
  secret:
    secretName: {{ .Values.gateway.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if and .Values.auth.jwt.enabled .Values.auth.jwt.jwks.secretName }}
- name: jwks
  secret:
    secretName: {{ .Values.auth.jwt.jwks.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The cross-field rules of gateway.tls and auth.jwt: a list of problems, one per line. */}}
{{- define "sluice.authProblems" -}}
{{- $tls := .Values.gateway.tls -}}
{{- $jwt := .Values.auth.jwt -}}
{{- if and $tls.enabled (not $tls.secretName) }}
gateway.tls.secretName: name the kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) of the gateway's certificate, e.g. the secretName of a cert-manager Certificate
{{- end }}
{{- if and $tls.requireClientCertificate (not $tls.enabled) }}
gateway.tls.requireClientCertificate needs gateway.tls.enabled=true
{{- end }}
{{- if and $tls.enabled (eq .Values.mode "istio") }}
gateway.tls.enabled is set but mode is istio: there is no sluice gateway; terminate TLS at your Istio Gateway (its credentialName)
{{- end }}
{{- if $jwt.enabled }}
{{- if not $jwt.issuer }}
auth.jwt.issuer: name the issuer (iss) whose tokens are accepted
{{- end }}
{{- if and $jwt.jwks.secretName $jwt.jwks.uri }}
auth.jwt.jwks: set secretName or uri, not both
{{- else if and (not $jwt.jwks.secretName) (not $jwt.jwks.uri) }}
auth.jwt.jwks: set secretName (a Secret with the JWKS) or uri (where the issuer publishes it)
{{- end }}
{{- if and (eq .Values.mode "istio") $jwt.jwks.secretName }}
auth.jwt.jwks.secretName: with mode=istio, Istio's RequestAuthentication fetches the keys itself: set auth.jwt.jwks.uri instead
{{- end }}
{{- if and $jwt.jwks.secretName (not $jwt.jwks.secretKey) }}
auth.jwt.jwks.secretKey: name the key of the JWKS in Secret {{ $jwt.jwks.secretName }}
{{- end }}
{{- if and $jwt.jwks.uri (not (hasPrefix "https://" $jwt.jwks.uri)) (not (hasPrefix "http://" $jwt.jwks.uri)) }}
auth.jwt.jwks.uri: {{ $jwt.jwks.uri | quote }} is not an http:// or https:// URL
{{- end }}
{{- end }}
{{- end -}}
