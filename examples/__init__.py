"""Examples shipped with masknorm (installed as masknorm.examples): `masknorm check
masknorm.examples.buggy_norm:sequence_norm` works from an installed package; in a checkout,
`examples.buggy_norm:sequence_norm` names the same file."""
