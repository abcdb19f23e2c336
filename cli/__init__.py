"""The `credits` command: parses, calls ledger/ or checks/, prints. No rule logic lives here."""
