{{/*
Cross-field rules that values.schema.json cannot express. Each failure names the value to fix.
Called from validate.yaml, so `helm template`/`install` fail before anything is rendered.
*/}}
{{- define "sluice.validateValues" -}}
{{- $problems := list -}}
{{- if not .Values.models -}}
{{- $problems = append $problems "models: list at least one model (name + versions), e.g. --set models[0].name=iris --set models[0].versions[0].version=1" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $model := .Values.models -}}
{{- if hasKey $seen $model.name -}}
{{- $problems = append $problems (printf "models[%d].name: model %q is listed twice" $i $model.name) -}}
{{- end -}}
{{- $_ := set $seen $model.name true -}}
{{- if gt (len (include "sluice.modelName" (dict "root" $ "model" $model.name))) 55 -}}
{{- $problems = append $problems (printf "models[%d].name: %q makes resource names longer than 63 characters with the release name: shorten it or set fullnameOverride" $i $model.name) -}}
{{- end -}}
{{- $versions := dict -}}
{{- $total := 0 -}}
{{- range $j, $version := $model.versions -}}
{{- $key := printf "%d" (int $version.version) -}}
{{- if hasKey $versions $key -}}
{{- $problems = append $problems (printf "models[%d].versions[%d].version: version %s of model %q is listed twice" $i $j $key $model.name) -}}
{{- end -}}
{{- $_ := set $versions $key true -}}
{{- $total = add $total (int (default 0 $version.weight)) -}}
{{- $cfg := fromYaml (include "sluice.versionSettings" (dict "root" $ "model" $model "version" $version)) -}}
{{- $where := printf "model %q version %s" $model.name $key -}}
{{- if and (eq $cfg.source.type "pvc") (not $cfg.source.pvc.claimName) -}}
{{- $problems = append $problems (printf "%s: source.type is pvc but source.pvc.claimName is empty" $where) -}}
{{- end -}}
{{- if and (eq $cfg.source.type "image") (not $cfg.source.image.repository) -}}
{{- $problems = append $problems (printf "%s: source.type is image but source.image.repository is empty" $where) -}}
{{- end -}}
{{- if and (eq $cfg.source.type "initContainer") (not $cfg.source.initContainer.image) -}}
{{- $problems = append $problems (printf "%s: source.type is initContainer but source.initContainer.image is empty" $where) -}}
{{- end -}}
{{- if and $cfg.autoscaling.enabled (gt (int $cfg.autoscaling.minReplicas) (int $cfg.autoscaling.maxReplicas)) -}}
{{- $problems = append $problems (printf "%s: autoscaling.minReplicas (%d) is above maxReplicas (%d)" $where (int $cfg.autoscaling.minReplicas) (int $cfg.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $.Values.mode "istio") $model.versions (ne $total 100) -}}
{{- $problems = append $problems (printf "models[%d] (%q): with mode=istio the version weights are VirtualService percentages and must sum to 100, not %d" $i $model.name $total) -}}
{{- end -}}
{{- if and $model.versions (le $total 0) -}}
{{- $problems = append $problems (printf "models[%d] (%q): the version weights sum to 0; give at least one version a weight above 0" $i $model.name) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.etcd.bundled.enabled -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- $problems = append $problems "etcd.external.endpoints: list your etcd endpoints, or set etcd.bundled.enabled=true" -}}
{{- end -}}
{{- if and .Values.etcd.external.tls.enabled (not .Values.etcd.external.tls.existingSecret) -}}
{{- $problems = append $problems "etcd.external.tls.existingSecret: name the Secret that holds the etcd CA (and client certificate)" -}}
{{- end -}}
{{- if and .Values.etcd.external.auth.enabled (not .Values.etcd.external.auth.existingSecret) -}}
{{- $problems = append $problems "etcd.external.auth.existingSecret: name the Secret that holds the etcd user name and password" -}}
{{- end -}}
{{- else if .Values.etcd.external.endpoints -}}
{{- $problems = append $problems "etcd.external.endpoints is set while etcd.bundled.enabled is true: set etcd.bundled.enabled=false to use your etcd" -}}
{{- end -}}
{{- if and (eq .Values.mode "gateway") .Values.istio.gateways -}}
{{- $problems = append $problems "istio.gateways is set but mode is gateway: Istio objects are rendered only with mode=istio" -}}
{{- end -}}
{{- if and .Values.istio.hosts (not .Values.istio.gateways) -}}
{{- $problems = append $problems "istio.hosts needs istio.gateways: external host names are only routed through an Istio Gateway" -}}
{{- end -}}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) -}}
{{- $problems = append $problems "gateway.autoscaling.minReplicas is above gateway.autoscaling.maxReplicas" -}}
{{- end -}}
{{- range (splitList "\n" (include "sluice.adminTlsProblems" .)) -}}
{{- if trim . -}}
{{- $problems = append $problems (trim .) -}}
{{- end -}}
{{- end -}}
{{- range (splitList "\n" (include "sluice.authProblems" .)) -}}
{{- if trim . -}}
{{- $problems = append $problems (trim .) -}}
{{- end -}}
{{- end -}}
{{- if $problems -}}
{{- fail (printf "\n\nsluice: invalid values:\n  - %s\n" (join "\n  - " $problems)) -}}
{{- end -}}
{{- end -}}
