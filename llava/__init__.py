"""GlobalCom2 reference implementation on a LLaVA-NeXT codebase (import name kept as upstream's `llava`)."""
