"""The lifecycle half: the pod watch, the drain endpoint's logic and the metrics reader
process. It shares only settings, the Kubernetes module, metrics and the HTTP layer with
the admission half (DESIGN.md "Code layout")."""
