"""What is shown about a feature, gathered once and rendered for the agent and for the pages.

    data.py        CardData: labels, imported explanations, logit lens, density and moments (gather_card)
    text.py        the card as markdown for feature_card
    describe.py    describe_features' evidence for several features within a character budget
"""
