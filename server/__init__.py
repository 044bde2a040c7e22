"""OpenAI- and Ollama-compatible server with a web chat page (`hetero serve`)."""
