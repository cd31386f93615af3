"""What runs on trained weights outside training: loading and export, batch eval jobs."""
