"""Forty-eight varied English sentences for comparing sentence embeddings of model copies."""

SENTENCES: list[str] = [
    # news-like
    "The central bank held interest rates steady on Thursday, citing slowing inflation and a cooling labour market.",
    "Flooding along the river forced hundreds of families from their homes overnight.",
    "The city council voted seven to two to expand the bike lane network by 2027.",
    "Shares in the chipmaker fell nine percent after it warned that demand from data centres would soften next quarter.",
    "Rescue teams reached the stranded climbers shortly after dawn.",
    "A new trade agreement between the two countries removes tariffs on most agricultural goods, although officials said several sensitive products would be phased in over a decade.",
    "The museum will return the bronze statues to the village they were taken from a century ago.",
    "Voter turnout in the regional election was the highest since records began.",
    "Firefighters contained the blaze before it reached the industrial estate.",
    "The striking rail workers accepted a revised pay offer late on Sunday evening.",
    "Scientists have discovered a new species of frog in the cloud forests of Ecuador.",
    "The minister resigned after an inquiry found she had misled parliament about the contract.",
    # technical
    "Gradient checkpointing trades extra compute for lower memory use during backpropagation.",
    "The function returns None when the key is missing instead of raising an exception.",
    "A B-tree keeps its keys sorted and allows searches, insertions and deletions in logarithmic time.",
    "Set the environment variable before starting the server, otherwise the default port is used.",
    "Mixed-precision training stores weights in sixteen-bit floats but accumulates gradients in single precision.",
    "The compiler inlines small functions to remove call overhead.",
    "TLS certificates must be renewed before they expire, or browsers will refuse the connection.",
    "Each shard of the checkpoint holds a subset of the tensors, and an index file maps every tensor name to its shard.",
    "Use a write-ahead log so that a crash in the middle of an update never leaves the database inconsistent.",
    "The kernel schedules threads across cores according to their priority and recent CPU usage.",
    "Quantising the weights to four bits shrinks the model roughly eightfold at some cost in accuracy.",
    "Run the linter in continuous integration so style problems are caught before review.",
    # casual
    "I can't believe it's already raining again.",
    "We ordered way too much pizza, so everyone took some home.",
    "My cat knocked a glass of water off the table this morning.",
    "Honestly, the sequel was better than the original film.",
    "Let's meet at the usual café around half past ten.",
    "He spent the whole weekend repainting the garden fence.",
    "The kids built an enormous sandcastle and then watched the tide wash it away.",
    "I finally finished that thousand-piece jigsaw puzzle of the Alps.",
    "She laughed so hard that coffee came out of her nose.",
    "Our neighbours are having a barbecue and the smell is making me hungry.",
    "A man is playing a guitar on a busy street corner.",
    "Someone strums an acoustic guitar for people walking past on the pavement.",
    # questions
    "What time does the last train to Edinburgh leave?",
    "How do I reset my password if I no longer have access to my email?",
    "Why is the sky blue during the day but red at sunset?",
    "Could you recommend a good book about the history of mathematics?",
    "Is it safe to eat mushrooms that you find growing in the woods?",
    "Which programming language should a complete beginner learn first?",
    "Where are the car keys?",
    "How many people live in Tokyo, and is the population still growing?",
    "Do you think remote work will remain common in ten years?",
    "What is the difference between weather and climate?",
    "Can dogs really understand the words we say to them, or only our tone of voice?",
    "When will the results of the survey be published?",
]

# Indices for the encoder's sanity check: two paraphrases, and an unrelated sentence.
PARAPHRASE = (34, 35)
UNRELATED = (34, 14)
