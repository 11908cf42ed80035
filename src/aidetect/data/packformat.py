"""What ``pack`` writes and every reader of a pack relies on: labels, file names, the format tag."""

CLASSES = {"real": 0, "fake": 1}  # positive class = AI-generated
MANIFEST = "manifest.json"
FORMAT = "aidetect-shards/1"
AUDIT_FILES = ("audit.json", "audit.png")  # what ``aidetect audit`` writes beside the shards
