"""What runs leave on disk and read back: paths and buckets (storage), the run and export folder
layout (runs), checkpoints, exports, the workdir lock and the metric writer. Every command and
the train and eval layers use it; it imports nothing above it."""
