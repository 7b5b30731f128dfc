"""Cloud side: model intake, calibration, sorting, allocation, rotation, quantization, checkpoint writing."""
