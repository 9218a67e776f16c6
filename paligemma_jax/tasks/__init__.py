"""Task-specific answer formats: detection boxes and segmentation masks."""
