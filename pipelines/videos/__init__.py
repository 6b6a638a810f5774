"""Video side of the data flows: metadata readers (WebVid CSV, HD-VILA JSONL); no text is carried."""
