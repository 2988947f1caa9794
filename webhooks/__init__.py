"""stunner-guard: admission and drain webhooks for STUNner's stunnerd pods."""
