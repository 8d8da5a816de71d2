{{/*
Envoy bootstrap of the standalone gateway: listeners and clusters come from the files the
controller publishes into /xds (lds.yaml, cds.yaml; they reference rds.yaml and eds-*.yaml), with
`watched_directory` so that the controller's `..data` symlink swap reloads them.
*/}}
{{- define "sluice.envoyBootstrap" -}}
node:
  id: sluice-gateway
  cluster: sluice-gateway
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: {{ .Values.gateway.adminPort }}}
dynamic_resources:
  lds_config:
    resource_api_version: V3
    path_config_source:
      path: /xds/lds.yaml
      watched_directory: {path: /xds}
  cds_config:
    resource_api_version: V3
    path_config_source:
      path: /xds/cds.yaml
      watched_directory: {path: /xds}
layered_runtime:
  layers:
    - name: static
      static_layer:
        overload.global_downstream_max_connections: 50000
        # one span export call per 512 spans (or 5 s), not Envoy's default 5 (docs/benchmarks.md)
        tracing.opentelemetry.min_flush_spans: 512
{{- end -}}
