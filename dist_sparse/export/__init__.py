"""Export to Hugging Face format (see DESIGN.md section 7)."""
