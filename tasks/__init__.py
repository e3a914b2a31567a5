"""Built-in synthetic worlds (corpus, prompts, tokenizer, gold scorers) so the RLHF loop runs offline.

from tasks.reviews import ReviewWorld, train_tokenizer
from tasks.gold import SentimentFluencyGold, SimulatedAnnotator, make_gold_preference_data
"""
