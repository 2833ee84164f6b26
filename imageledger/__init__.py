"""imageledger: a local OCI image cache whose whole state is an event-sourced ledger."""
