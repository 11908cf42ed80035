"""Running on clusters: profiles, the submitit launcher, cross-validation reports, job status."""
