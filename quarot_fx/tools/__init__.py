"""Around the compiler: model loading, the perplexity protocol, the demo."""
