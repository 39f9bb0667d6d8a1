"""Code that reads and writes data: fastMRI files, synthetic scans, training sets."""
