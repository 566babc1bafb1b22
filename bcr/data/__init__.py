"""Problems in: readers of the JSONL/DAPO schemas, synthetic arithmetic, and bundling N problems."""
