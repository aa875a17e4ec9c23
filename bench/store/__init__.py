"""Step 3: what the stages write: the content-addressed cache, the record logs, fitted models."""
