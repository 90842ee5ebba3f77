"""Procedural visual-search probes: the generator, its wording and palette, and the policies that know them."""
