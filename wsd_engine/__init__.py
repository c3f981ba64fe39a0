"""wsd_engine: Weak-to-Strong Decoding engine."""
