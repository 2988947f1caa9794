"""The lifecycle half: the pod watch (podwatch.py), the drain endpoint's logic (drain.py),
the census of pod-deletion-costs (census.py) and its leader election (leader.py),
Kubernetes Events on pods (events.py) and the metrics reader process (scrape.py). It
shares only settings, the Kubernetes module, metrics and the HTTP layer with the admission
half (DESIGN.md "Code layout")."""
