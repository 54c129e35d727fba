"""`progsae train`: TopK and Matryoshka SAEs on an activation cache, resumable after kill -9."""
