"""Progressive delivery per model version: the rollout document, its pure state machine, the
figures it judges (scraped from the services' /metrics) and the controller that drives it."""
