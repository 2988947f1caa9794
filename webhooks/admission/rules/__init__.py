"""One module per kind the guard acts on; each exposes ``review(object, Context) -> Outcome``."""
