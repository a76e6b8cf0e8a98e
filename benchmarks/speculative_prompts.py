"""Prompts of the speculative decoding benchmark, written for it (no dataset is reachable offline).

Input-grounded: the answer repeats much of a text given in the prompt (rewrite or edit a code block, extract from a
passage), the case prompt lookup is for. Open-ended: nothing to copy, the case where it must not cost time.
"""

from __future__ import annotations

_INVENTORY = """def summarize_inventory(items):
    totals = {}
    for item in items:
        name = item["name"]
        quantity = item["quantity"]
        price = item["price"]
        if name not in totals:
            totals[name] = {"quantity": 0, "value": 0.0}
        totals[name]["quantity"] += quantity
        totals[name]["value"] += quantity * price
    report = []
    for name, total in sorted(totals.items()):
        report.append(name + ": " + str(total["quantity"]) + " units, $" + str(round(total["value"], 2)))
    return "\\n".join(report)
"""

_PARSER = """def parse_config(lines):
    config = {}
    section = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            config[section] = {}
            continue
        key, value = line.split("=", 1)
        if section is None:
            raise ValueError("key outside a section: " + key)
        config[section][key.strip()] = value.strip()
    return config
"""

_JS_CART = """function cartTotal(cart, discounts) {
  var total = 0;
  for (var i = 0; i < cart.length; i++) {
    var item = cart[i];
    var price = item.price * item.quantity;
    if (discounts[item.sku]) {
      price = price - price * discounts[item.sku];
    }
    total = total + price;
  }
  if (total > 100) {
    total = total - 5;
  }
  return Math.round(total * 100) / 100;
}
"""

_STACK = """class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if len(self.items) == 0:
            return None
        return self.items.pop()

    def peek(self):
        if len(self.items) == 0:
            return None
        return self.items[-1]

    def size(self):
        return len(self.items)
"""

_FETCH = """import json
import urllib.request


def fetch_users(base_url, limit):
    url = base_url + "/users?limit=" + str(limit)
    response = urllib.request.urlopen(url)
    data = json.loads(response.read())
    users = []
    for entry in data["users"]:
        if entry["active"]:
            users.append({"id": entry["id"], "name": entry["name"], "email": entry["email"]})
    return users
"""

_SQL = """SELECT customers.name, orders.id, orders.total
FROM customers
JOIN orders ON orders.customer_id = customers.id
WHERE orders.total > 100
  AND orders.status = 'shipped'
  AND customers.country = 'France'
ORDER BY orders.total DESC
LIMIT 20;
"""

_LIGHTHOUSE = (
    "The lighthouse on Saint Marren island was built in 1874 by the engineer Thomas Allard. It stands 38 metres "
    "tall and its light, first fuelled by whale oil, was converted to kerosene in 1902 and to electricity in 1951. "
    "The last keeper, Margaret Ellis, left the island in 1987 when the light was automated. Today the keeper's "
    "cottage is a small museum, open from May to September, and the tower can be climbed on Saturdays. The island "
    "is reached by a ferry from Port Alden that runs twice a day in summer and once a day in winter."
)

_MEETING = (
    "Minutes of the planning meeting, 14 March. Present: Ana Ruiz (chair), Ben Okafor, Chloe Martin, David Chen. "
    "Ana opened the meeting at 10:00 and reviewed the budget, which stands at 48,000 euros for the year. Ben reported "
    "that the new website will launch on 2 April, two weeks later than planned, because the payment provider needs "
    "more testing. Chloe proposed moving the summer workshop from Lyon to Grenoble to reduce costs; the group agreed. "
    "David will contact three venues in Grenoble by 21 March. The next meeting is on 28 March at 10:00."
)

_RECIPE = (
    "To make the bread, mix 500 grams of flour, 10 grams of salt and 7 grams of dried yeast in a large bowl. Add 320 "
    "millilitres of warm water and 2 tablespoons of olive oil, then knead the dough for ten minutes until it is "
    "smooth. Cover the bowl and leave it in a warm place for one hour, until the dough has doubled in size. Shape it "
    "into a loaf, place it in a greased tin and let it rise for another 30 minutes. Bake at 220 degrees Celsius for "
    "30 to 35 minutes, until the loaf sounds hollow when tapped underneath."
)

_PRODUCT = (
    "The Aurora X2 headphones weigh 254 grams and offer up to 30 hours of playback with noise cancelling switched "
    "on, or 40 hours with it off. A ten-minute charge over USB-C gives five hours of listening. They connect over "
    "Bluetooth 5.3 to two devices at once and support the AAC and LDAC codecs. The ear cushions are replaceable and "
    "come in black, sand and navy. The price is 299 dollars, and the warranty covers two years."
)

INPUT_GROUNDED: list[str] = [
    f"Rewrite this Python function with type hints and a docstring. Keep the logic the same.\n\n{_INVENTORY}",
    f"Rename the variable `section` to `current_section` in this code and return the full code.\n\n{_PARSER}",
    f"Convert this JavaScript function to use `let`/`const` and a for...of loop. Return the whole function.\n\n"
    f"{_JS_CART}",
    f"Add a comment above every method of this class explaining what it does. Return the full class.\n\n{_STACK}",
    f"Rewrite this code to use f-strings instead of string concatenation. Return the complete code.\n\n{_FETCH}",
    f"Reformat this SQL query so that every keyword is lowercase. Return the whole query.\n\n{_SQL}",
    f"Fix the style of this function (PEP 8) without changing what it does. Return the full code.\n\n{_PARSER}",
    f"Read the passage and list every date and year it mentions, each with the sentence it appears in.\n\n"
    f"{_LIGHTHOUSE}",
    f"From these minutes, extract each decision and action item, quoting the sentence from the text.\n\n{_MEETING}",
    f"Copy the recipe below as a numbered list of steps, keeping the quantities exactly as written.\n\n{_RECIPE}",
    f"Extract every specification from this product description as a bullet list, using the original wording.\n\n"
    f"{_PRODUCT}",
    f"Repeat the passage below, replacing the name 'Margaret Ellis' with 'Mary Ellis' everywhere.\n\n{_LIGHTHOUSE}",
]

OPEN_ENDED: list[str] = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are some good habits for staying healthy while working from home?",
    "Describe a perfect day at the beach.",
    "Give me five ideas for a birthday party for a seven-year-old.",
    "Why do people enjoy listening to music?",
    "Write a poem about the autumn forest.",
    "What should I consider when choosing a first programming language?",
    "Tell me about the history of bicycles.",
    "How can a small town attract more tourists?",
    "Write a letter to a friend describing your new apartment.",
    "What are the advantages and disadvantages of electric cars?",
]
