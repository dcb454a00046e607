"""Data path: files -> validated rows -> examples -> length-grouped, dynamically padded batches."""
