"""Fetching a patient's prior study from a PACS (C-FIND / C-MOVE) when the node lacks one."""
