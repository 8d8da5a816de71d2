"""What every sluice process shares to be observed and run: structlog set-up, OpenTelemetry
tracing, the local OTLP receiver behind ``sluice traces``."""
