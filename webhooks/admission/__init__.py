"""The admission half: AdmissionReview decoding and encoding (review), dispatch by kind,
the per-kind rules, the policy's pure functions, stunnerd container knowledge and
Kubernetes quantities. It shares only settings, the Kubernetes module, metrics and the HTTP
layer with the lifecycle half (DESIGN.md "Code layout")."""
