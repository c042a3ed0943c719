"""The volume: quorum rules (pure) and the volume client process beside the writer."""
