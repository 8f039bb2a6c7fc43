#!/usr/bin/env python3
"""Build the code-fusion benchmark's training and validation tasks (see README.md beside this file).

Python function-writing tasks, each with asserts computed from a reference implementation
written here. Families of tasks are parameterised (a divisor, a character, a shift, a width...)
so that each variant is its own task with its own function name and tests. None is taken from
HumanEval; `--humaneval FILE` checks that mechanically (no shared function name, and no task
description close to a HumanEval docstring: word-level similarity ratio below THRESHOLD) and
writes the nearest pairs into the data card's numbers (check.json).

Writes train.jsonl and val.jsonl (prompts: `{"id", "prompt"}`), tests.jsonl (`{"id", "tests"}`,
for the `python-tests` reward) and check.json. Standard library only; deterministic.

    python3 data/code-tasks/make_code_tasks.py --humaneval ~/.cache/fuserl/data/HumanEval.jsonl
"""
import argparse
import ast
import difflib
import hashlib
import json
import math
import pathlib
import re
import string

HERE = pathlib.Path(__file__).resolve().parent
THRESHOLD = 0.5
VAL_FRACTION = 0.2
SUFFIX = " Reply with the code in a ```python block."

TASKS = []  # (id, entry_point, description, tests)

# Reference helpers of some tasks.

def _is_subseq(a, b):
    it = iter(b)
    return all(c in it for c in a)

def _roman(s):
    v = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    return sum(-v[c] if i + 1 < len(s) and v[c] < v[s[i + 1]] else v[c] for i, c in enumerate(s))

def _collatz(n):
    while True:
        yield n
        n = n // 2 if n % 2 == 0 else 3 * n + 1

def _lucas(n):
    a, b = 2, 1
    for _ in range(n):
        a, b = b, a + b
    return a

def _pell(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, 2 * b + a
    return a

def _base(n, b):
    if n == 0:
        return "0"
    out = ""
    while n:
        out = str(n % b) + out
        n //= b
    return out

def _longest_run(xs):
    best = cur = 0
    for i, x in enumerate(xs):
        cur = cur + 1 if i and x > xs[i - 1] else 1
        best = max(best, cur)
    return best

def _depth(x):
    return 0 if not isinstance(x, list) else 1 + max((_depth(y) for y in x), default=0)

def _balanced(s, o, c):
    depth = 0
    for ch in s:
        depth += (ch == o) - (ch == c)
        if depth < 0:
            return False
    return depth == 0

def _nested_get(d, p):
    for k in p:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def task(name, args, description, ref, inputs, compare="=="):
    """One task: `name(args)` described by `description`, with an assert per input."""
    tests = []
    for inp in inputs:
        inp = inp if isinstance(inp, tuple) else (inp,)
        want = ref(*inp)
        call = f"{name}({', '.join(repr(x) for x in inp)})"
        if compare == "approx":
            tests.append(f"assert abs({call} - {want!r}) < 1e-6")
        else:
            tests.append(f"assert {call} == {want!r}")
    signature = f"`{name}({args})`"
    TASKS.append((name.replace("_", "-"), name, f"Write a Python function {signature} that {description}.", tests))


# --- numbers -------------------------------------------------------------------------------
for k in (3, 4, 6, 7, 9, 11):
    task(f"sum_multiples_of_{k}", "n", f"returns the sum of all positive integers below `n` that are divisible by {k}",
         lambda n, k=k: sum(i for i in range(1, n) if i % k == 0), [1, 10, 25, 100, 7])
for k in (2, 3, 5):
    task(f"count_divisible_by_{k}", "xs", f"returns how many integers in the list `xs` are divisible by {k}",
         lambda xs, k=k: sum(1 for x in xs if x % k == 0), [[], [1, 2, 3, 4, 5, 6], [10, 15, 20, 7], [0, -3, 9]])
for p in (2, 3):
    task(f"sum_of_powers_{p}", "n", f"returns 1**{p} + 2**{p} + ... + n**{p} for a non-negative integer `n` (0 for n = 0)",
         lambda n, p=p: sum(i ** p for i in range(1, n + 1)), [0, 1, 3, 10])
task("digit_product", "n", "returns the product of the decimal digits of the non-negative integer `n`",
     lambda n: math.prod(int(d) for d in str(n)), [0, 5, 123, 999, 405])
task("count_digits", "n", "returns how many decimal digits the integer `n` has, ignoring its sign",
     lambda n: len(str(abs(n))), [0, 7, -12, 12345, 1000000])
task("reverse_integer", "n", "returns the integer whose decimal digits are those of the non-negative integer `n` in reverse order (leading zeros dropped)",
     lambda n: int(str(n)[::-1]), [0, 12, 1200, 98765])
task("is_armstrong", "n", "returns True when the non-negative integer `n` equals the sum of its digits each raised to the number of digits (for example 153 = 1**3 + 5**3 + 3**3), else False",
     lambda n: n == sum(int(d) ** len(str(n)) for d in str(n)), [0, 10, 153, 154, 9474])
task("divisor_count", "n", "returns the number of positive divisors of the positive integer `n`",
     lambda n: sum(1 for d in range(1, n + 1) if n % d == 0), [1, 6, 12, 13, 36])
task("sum_proper_divisors", "n", "returns the sum of the positive divisors of the positive integer `n` that are smaller than `n`",
     lambda n: sum(d for d in range(1, n) if n % d == 0), [1, 6, 12, 28, 13])
task("is_perfect_number", "n", "returns True when the positive integer `n` equals the sum of its divisors smaller than itself, else False",
     lambda n: n == sum(d for d in range(1, n) if n % d == 0), [6, 28, 12, 1, 496])
task("collatz_steps", "n", "returns how many steps the Collatz process (halve an even number, map an odd one to 3*x + 1) takes to bring the positive integer `n` to 1",
     lambda n: next(i for i, x in enumerate(_collatz(n)) if x == 1), [1, 2, 6, 7, 27])



for b in (2, 3, 5):
    task(f"is_power_of_{b}", "n", f"returns True when the integer `n` is a power of {b} ({b}**0 = 1 included), else False",
         lambda n, b=b: n >= 1 and b ** round(math.log(n, b)) == n, [1, b, b ** 4, b ** 4 + 1, 0, -b])
task("count_set_bits", "n", "returns the number of 1 bits in the binary representation of the non-negative integer `n`",
     lambda n: bin(n).count("1"), [0, 1, 7, 8, 255, 1023])
task("triangular_number", "n", "returns the n-th triangular number, 1 + 2 + ... + n, for a non-negative integer `n`",
     lambda n: n * (n + 1) // 2, [0, 1, 4, 100])
task("lcm_of_two", "a, b", "returns the least common multiple of the positive integers `a` and `b`",
     lambda a, b: a * b // math.gcd(a, b), [(4, 6), (3, 5), (12, 18), (7, 7)])
task("lcm_of_list", "xs", "returns the least common multiple of the non-empty list of positive integers `xs`",
     lambda xs: math.lcm(*xs), [[2, 3, 4], [5], [6, 10, 15], [1, 1]])
task("nth_pentagonal", "n", "returns the n-th pentagonal number n * (3n - 1) / 2 as an integer, for a positive integer `n`",
     lambda n: n * (3 * n - 1) // 2, [1, 2, 5, 10])
task("lucas_number", "n", "returns the n-th Lucas number (L0 = 2, L1 = 1, and each next is the sum of the previous two)",
     lambda n: _lucas(n), [0, 1, 2, 5, 10])



task("pell_number", "n", "returns the n-th Pell number (P0 = 0, P1 = 1, P(n) = 2 * P(n-1) + P(n-2))",
     lambda n: _pell(n), [0, 1, 2, 5, 8])



task("binomial", "n, k", "returns the binomial coefficient C(n, k) (0 when k > n) for non-negative integers",
     lambda n, k: math.comb(n, k), [(5, 2), (10, 0), (3, 4), (20, 10)])
task("double_factorial", "n", "returns the double factorial n!! = n * (n-2) * (n-4) * ... down to 1 or 2, with 0!! = 1",
     lambda n: math.prod(range(n, 0, -2)), [0, 1, 5, 6, 9])
task("digital_root", "n", "returns the digital root of the non-negative integer `n`: its digits summed again and again until one digit remains",
     lambda n: 0 if n == 0 else 1 + (n - 1) % 9, [0, 9, 38, 12345, 99999])
task("is_harshad", "n", "returns True when the positive integer `n` is divisible by the sum of its digits, else False",
     lambda n: n % sum(int(d) for d in str(n)) == 0, [18, 19, 21, 1, 111])
task("to_base_3", "n", "returns the base-3 representation of the non-negative integer `n` as a string of digits",
     lambda n: _base(n, 3), [0, 2, 3, 10, 100])
task("to_base_7", "n", "returns the base-7 representation of the non-negative integer `n` as a string of digits",
     lambda n: _base(n, 7), [0, 6, 7, 49, 100])



task("from_binary_string", "s", "returns the integer whose binary representation is the string `s` of 0s and 1s",
     lambda s: int(s, 2), ["0", "1", "101", "11111111"])
task("clamp", "x, low, high", "returns `x` limited to the range [`low`, `high`]: `low` if it is smaller, `high` if it is larger",
     lambda x, lo, hi: max(lo, min(hi, x)), [(5, 0, 10), (-3, 0, 10), (12, 0, 10), (0, 0, 0)])
task("sign_of", "x", "returns 1 for a positive number `x`, -1 for a negative one and 0 for zero",
     lambda x: (x > 0) - (x < 0), [5, -2.5, 0, 100])
task("celsius_to_fahrenheit", "c", "converts a temperature `c` in degrees Celsius to degrees Fahrenheit",
     lambda c: c * 9 / 5 + 32, [0, 100, -40, 37.5], compare="approx")
task("hypotenuse", "a, b", "returns the length of the hypotenuse of a right triangle with legs `a` and `b`",
     lambda a, b: math.hypot(a, b), [(3, 4), (5, 12), (1, 1)], compare="approx")
task("circle_area", "r", "returns the area of a circle of radius `r`, using math.pi",
     lambda r: math.pi * r * r, [0, 1, 2.5], compare="approx")
task("distance_2d", "p, q", "returns the Euclidean distance between the points `p` and `q`, each a tuple (x, y)",
     lambda p, q: math.dist(p, q), [((0, 0), (3, 4)), ((1, 1), (1, 1)), ((-1, 2), (2, -2))], compare="approx")
task("seconds_to_hms", "s", "converts a non-negative number of seconds `s` into a string 'H:MM:SS'",
     lambda s: f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}", [0, 59, 61, 3600, 86399])
task("is_leap_year", "y", "returns True when the year `y` is a leap year of the Gregorian calendar, else False",
     lambda y: y % 4 == 0 and (y % 100 != 0 or y % 400 == 0), [2000, 1900, 2024, 2023])

# --- lists ---------------------------------------------------------------------------------
task("sum_of_evens", "xs", "returns the sum of the even integers in the list `xs`",
     lambda xs: sum(x for x in xs if x % 2 == 0), [[], [1, 2, 3, 4], [-2, 5, 8], [1, 3]])
task("product_of_list", "xs", "returns the product of the numbers in the list `xs` (1 for an empty list)",
     lambda xs: math.prod(xs), [[], [2, 3, 4], [5], [-1, 2, -3]])
task("range_of_list", "xs", "returns the largest number minus the smallest number of the non-empty list `xs`",
     lambda xs: max(xs) - min(xs), [[1, 5, 3], [7], [-2, 10, 4]])
task("count_negatives", "xs", "returns how many numbers in the list `xs` are negative",
     lambda xs: sum(1 for x in xs if x < 0), [[], [1, -2, 3, -4], [-1, -1], [0, 5]])
task("second_largest_distinct", "xs", "returns the second largest distinct value in the list `xs`, or None when it has fewer than two distinct values",
     lambda xs: sorted(set(xs))[-2] if len(set(xs)) > 1 else None, [[1, 2, 3], [5, 5, 4], [7, 7], [], [10, 20, 20, 15]])
task("cumulative_sum", "xs", "returns the list of running totals of the list `xs` (element i is the sum of xs[0] to xs[i])",
     lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))], [[], [1, 2, 3], [5, -5, 5]])
task("pairwise_differences", "xs", "returns the list of differences xs[i+1] - xs[i] between consecutive elements of `xs`",
     lambda xs: [b - a for a, b in zip(xs, xs[1:])], [[], [4], [1, 4, 9, 16], [5, 3, 3]])
task("index_of_max", "xs", "returns the index of the first largest element of the non-empty list `xs`",
     lambda xs: xs.index(max(xs)), [[3, 9, 2, 9], [1], [-5, -2, -9]])
task("index_of_min", "xs", "returns the index of the first smallest element of the non-empty list `xs`",
     lambda xs: xs.index(min(xs)), [[3, 1, 2, 1], [4], [0, -1, 5]])
task("mean_of_list", "xs", "returns the arithmetic mean of the non-empty list of numbers `xs`",
     lambda xs: sum(xs) / len(xs), [[1, 2, 3, 4], [5], [-1, 1]], compare="approx")
task("mode_of_list", "xs", "returns the value that occurs most often in the non-empty list `xs`, the smallest such value on a tie",
     lambda xs: min(x for x in set(xs) if xs.count(x) == max(xs.count(y) for y in xs)), [[1, 2, 2, 3], [4], [3, 1, 3, 1], [5, 5, 6, 6, 6]])
task("variance_of_list", "xs", "returns the population variance (mean of squared deviations from the mean) of the non-empty list `xs`",
     lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs), [[1, 2, 3, 4], [5, 5], [2, 4, 4, 4, 5, 5, 7, 9]], compare="approx")
for k in (2, 3, 4):
    task(f"chunk_by_{k}", "xs", f"splits the list `xs` into consecutive chunks of {k} elements (the last chunk may be shorter) and returns the list of chunks",
         lambda xs, k=k: [xs[i:i + k] for i in range(0, len(xs), k)], [[], [1, 2, 3, 4, 5, 6, 7], list(range(k))])
for k in (1, 2, 3):
    task(f"rotate_left_{k}", "xs", f"returns the list `xs` rotated left by {k} position(s) (the first element(s) moved to the end)",
         lambda xs, k=k: xs[k % len(xs):] + xs[:k % len(xs)] if xs else [], [[], [1, 2, 3, 4, 5], [9]])
task("interleave_lists", "a, b", "returns a list taking elements alternately from `a` and `b`, starting with `a`, and then the rest of the longer list",
     lambda a, b: [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):], [([1, 2, 3], ["a", "b", "c"]), ([1], [2, 3, 4]), ([], [5])])
task("flatten_once", "xss", "returns one list with the elements of the lists inside the list `xss`, in order",
     lambda xss: [x for xs in xss for x in xs], [[], [[1, 2], [3], []], [["a"], ["b", "c"]]])
task("transpose_matrix", "m", "returns the transpose of the matrix `m`, given as a non-empty list of equal-length rows",
     lambda m: [list(r) for r in zip(*m)], [[[1, 2, 3], [4, 5, 6]], [[1]], [[1, 2], [3, 4]]])
task("matrix_trace", "m", "returns the sum of the main diagonal of the square matrix `m` (a list of rows)",
     lambda m: sum(m[i][i] for i in range(len(m))), [[[1, 2], [3, 4]], [[5]], [[1, 0, 0], [0, 2, 0], [0, 0, 3]]])
task("matrix_add", "a, b", "returns the element-wise sum of the two matrices `a` and `b` of the same shape (lists of rows)",
     lambda a, b: [[x + y for x, y in zip(r, s)] for r, s in zip(a, b)], [([[1, 2]], [[3, 4]]), ([[1], [2]], [[0], [-2]])])
task("dot_product", "a, b", "returns the dot product of the equal-length lists of numbers `a` and `b`",
     lambda a, b: sum(x * y for x, y in zip(a, b)), [([1, 2, 3], [4, 5, 6]), ([], []), ([2], [-3])])
task("scale_list", "xs, k", "returns a new list with every number of `xs` multiplied by `k`",
     lambda xs, k: [x * k for x in xs], [([1, 2, 3], 2), ([], 5), ([4], 0)])
task("keep_above_mean", "xs", "returns the elements of the non-empty list `xs` that are strictly greater than its mean, in order",
     lambda xs: [x for x in xs if x > sum(xs) / len(xs)], [[1, 2, 3, 4], [5, 5], [10, 0, 2]])
task("count_occurrences", "xs, v", "returns how many times the value `v` appears in the list `xs`",
     lambda xs, v: xs.count(v), [([1, 2, 1, 1], 1), ([], 3), (["a", "b"], "c")])
task("last_index_of", "xs, v", "returns the index of the last occurrence of `v` in the list `xs`, or -1 if it is absent",
     lambda xs, v: max((i for i, x in enumerate(xs) if x == v), default=-1), [([1, 2, 1], 1), ([3], 4), ([], 0)])
task("positions_of", "xs, v", "returns the list of every index at which the value `v` occurs in the list `xs`",
     lambda xs, v: [i for i, x in enumerate(xs) if x == v], [([1, 2, 1, 3, 1], 1), ([], 2), ([5, 6], 7)])
task("remove_value", "xs, v", "returns a new list with every occurrence of `v` removed from the list `xs`",
     lambda xs, v: [x for x in xs if x != v], [([1, 2, 1, 3], 1), ([], 1), ([4, 4], 4)])
task("split_even_odd", "xs", "returns a tuple of two lists: the even integers of `xs` and the odd ones, each in their original order",
     lambda xs: ([x for x in xs if x % 2 == 0], [x for x in xs if x % 2]), [[1, 2, 3, 4], [], [7, 9]])
task("zip_to_dict", "keys, values", "returns a dictionary mapping each element of `keys` to the element of `values` at the same position",
     lambda k, v: dict(zip(k, v)), [(["a", "b"], [1, 2]), ([], []), ([1], ["x"])])
task("max_consecutive_ones", "xs", "returns the length of the longest run of consecutive 1s in the list `xs` of 0s and 1s",
     lambda xs: max((len(r) for r in "".join(map(str, xs)).split("0")), default=0), [[1, 1, 0, 1, 1, 1], [], [0, 0], [1]])
task("longest_increasing_run", "xs", "returns the length of the longest run of strictly increasing consecutive elements in the list `xs` (0 for an empty list)",
     lambda xs: _longest_run(xs), [[], [5], [1, 2, 3, 2, 3], [3, 2, 1]])



task("missing_number", "xs", "returns the one number missing from the list `xs`, which holds every integer from 0 to len(xs) except one",
     lambda xs: len(xs) * (len(xs) + 1) // 2 - sum(xs), [[0, 1, 3], [1], [0], [4, 2, 0, 1]])
task("has_duplicates", "xs", "returns True when some value appears more than once in the list `xs`, else False",
     lambda xs: len(set(xs)) != len(xs), [[1, 2, 3], [1, 2, 1], []])
task("merge_sorted", "a, b", "merges the two sorted lists `a` and `b` into one sorted list",
     lambda a, b: sorted(a + b), [([1, 4, 6], [2, 3, 7]), ([], [1]), ([5], [])])
task("elementwise_max", "a, b", "returns the list of the larger of a[i] and b[i] for each position of the equal-length lists `a` and `b`",
     lambda a, b: [max(x, y) for x, y in zip(a, b)], [([1, 5, 3], [4, 2, 3]), ([], [])])
task("sum_of_squares_list", "xs", "returns the sum of the squares of the numbers in the list `xs`",
     lambda xs: sum(x * x for x in xs), [[], [1, 2, 3], [-4]])
task("moving_average_3", "xs", "returns the list of averages of each three consecutive numbers of `xs` (empty when it has fewer than three)",
     lambda xs: [sum(xs[i:i + 3]) / 3 for i in range(len(xs) - 2)], [[1, 2, 3, 4], [1, 2], [3, 3, 3]])
task("nested_depth", "x", "returns the nesting depth of `x`: 0 for something that is not a list, else 1 plus the largest depth of its elements (1 for an empty list)",
     lambda x: _depth(x), [5, [], [1, [2, [3]]], [[], [[]]]])



# --- strings -------------------------------------------------------------------------------
for ch, word in (("a", "a"), ("e", "e"), ("s", "s"), (" ", "space"), (",", "comma")):
    task(f"count_{word}_chars" if word in ("space", "comma") else f"count_letter_{word}", "s",
         f"returns how many times the character {ch!r} occurs in the string `s`",
         lambda s, ch=ch: s.count(ch), ["", "banana, sees", "a e s , ", "xyz"])
for k in (1, 3, 7):
    task(f"caesar_encode_{k}", "s", f"shifts every lowercase letter of the string `s` forward by {k} in the alphabet, wrapping from z to a, and leaves other characters unchanged",
         lambda s, k=k: "".join(chr((ord(c) - 97 + k) % 26 + 97) if c.islower() else c for c in s), ["abc", "xyz", "hello, world", ""])
task("count_words", "s", "returns the number of words in the string `s`, where words are separated by whitespace",
     lambda s: len(s.split()), ["", "one", "two words", "  spaced   out  words "])
task("longest_word", "s", "returns the longest word of the string `s` (words separated by spaces; the first one on a tie; '' for no words)",
     lambda s: max(s.split(), key=len, default=""), ["", "a bb ccc dd", "tie tie", "hello"])
task("first_unique_char", "s", "returns the first character of the string `s` that occurs exactly once in it, or '' if there is none",
     lambda s: next((c for c in s if s.count(c) == 1), ""), ["aabbc", "abcab", "aabb", ""])
task("char_frequencies", "s", "returns a dictionary mapping each character of the string `s` to how many times it occurs",
     lambda s: {c: s.count(c) for c in s}, ["", "aab", "hello"])
task("is_anagram_of", "a, b", "returns True when the strings `a` and `b` contain the same characters the same number of times, else False",
     lambda a, b: sorted(a) == sorted(b), [("listen", "silent"), ("abc", "abd"), ("", "")])
task("run_length_encode", "s", "returns the run-length encoding of the string `s`: each run of a repeated character written as the character followed by the run's length, for example 'aaab' -> 'a3b1'",
     lambda s: "".join(f"{m.group(0)[0]}{len(m.group(0))}" for m in re.finditer(r"(.)\1*", s)), ["", "aaab", "abc", "zzzzzz"])
task("run_length_decode", "s", "decodes a string of character-count pairs with single-digit counts, such as 'a3b1', into the expanded string 'aaab'",
     lambda s: "".join(s[i] * int(s[i + 1]) for i in range(0, len(s), 2)), ["", "a3b1", "x1y2z3"])
task("acronym", "s", "returns the uppercase first letters of the words of the string `s`, joined together",
     lambda s: "".join(w[0].upper() for w in s.split()), ["portable network graphics", "", "as soon as possible"])
task("snake_to_camel", "s", "converts a snake_case identifier `s` to camelCase (the first word stays lowercase)",
     lambda s: s.split("_")[0] + "".join(w.capitalize() for w in s.split("_")[1:]), ["hello_world", "a", "make_it_work_now"])
task("camel_to_snake", "s", "converts a camelCase identifier `s` to snake_case (each uppercase letter becomes '_' and its lowercase)",
     lambda s: "".join("_" + c.lower() if c.isupper() else c for c in s), ["helloWorld", "a", "makeItWorkNow"])
task("title_case_words", "s", "returns the string `s` with the first letter of every space-separated word in uppercase and the rest in lowercase",
     lambda s: " ".join(w.capitalize() for w in s.split(" ")), ["hello world", "PYTHON is FUN", ""])
task("reverse_each_word", "s", "returns the string `s` with every space-separated word reversed in place, word order kept",
     lambda s: " ".join(w[::-1] for w in s.split(" ")), ["hello world", "abc", ""])
task("reverse_word_order", "s", "returns the words of the string `s` (separated by single spaces) in reverse order, joined by single spaces",
     lambda s: " ".join(s.split(" ")[::-1]), ["one two three", "single", "a b"])
task("keep_digits", "s", "returns a string of only the digit characters of `s`, in order",
     lambda s: "".join(c for c in s if c.isdigit()), ["a1b2c3", "none", "2024-01-01"])
task("keep_letters", "s", "returns a string of only the alphabetic characters of `s`, in order",
     lambda s: "".join(c for c in s if c.isalpha()), ["a1b2c3", "123", "Hi, there!"])
task("double_each_char", "s", "returns the string `s` with every character written twice, for example 'ab' -> 'aabb'",
     lambda s: "".join(c * 2 for c in s), ["ab", "", "x y"])
task("spaces_to_underscores", "s", "returns the string `s` with every space replaced by an underscore",
     lambda s: s.replace(" ", "_"), ["a b c", "", "no_spaces"])
task("count_consonants", "s", "returns how many characters of the string `s` are English consonant letters (letters other than a, e, i, o, u, in either case)",
     lambda s: sum(1 for c in s if c.isalpha() and c.lower() not in "aeiou"), ["hello", "AEIOU", "", "Rhythm"])
task("is_pangram", "s", "returns True when the string `s` contains every letter of the English alphabet at least once (ignoring case), else False",
     lambda s: set(string.ascii_lowercase) <= set(s.lower()), ["The quick brown fox jumps over the lazy dog", "hello", ""])
task("is_isogram", "s", "returns True when no letter occurs more than once in the string `s` (ignoring case), else False",
     lambda s: len(set(s.lower())) == len(s), ["machine", "hello", "", "Alpha"])
task("common_prefix", "words", "returns the longest common prefix of the list of strings `words` ('' for an empty list)",
     lambda ws: "" if not ws else next((ws[0][:i] for i in range(len(ws[0])) if any(len(w) <= i or w[i] != ws[0][i] for w in ws)), min(ws, key=len)), [["flower", "flow", "flight"], ["dog", "car"], [], ["same", "same"]])
task("pad_left_zeros", "n, width", "returns the non-negative integer `n` as a string padded on the left with zeros to at least `width` characters",
     lambda n, w: str(n).zfill(w), [(5, 3), (1234, 2), (0, 1)])
task("count_substring_overlapping", "s, sub", "returns how many times the non-empty string `sub` occurs in `s`, counting overlapping occurrences",
     lambda s, sub: sum(1 for i in range(len(s)) if s.startswith(sub, i)), [("aaaa", "aa"), ("abcabc", "abc"), ("", "a")])
task("mask_all_but_last_4", "s", "returns the string `s` with every character except the last four replaced by '#'",
     lambda s: "#" * max(len(s) - 4, 0) + s[-4:], ["1234567890", "abc", "abcd", ""])
task("wrap_in_tag", "tag, text", "returns `text` wrapped in the HTML tag `tag`, for example ('b', 'hi') -> '<b>hi</b>'",
     lambda t, x: f"<{t}>{x}</{t}>", [("b", "hi"), ("p", ""), ("em", "a b")])
task("initials_of_name", "name", "returns the initials of a full name (words separated by spaces), uppercase, each followed by a dot, for example 'ada lovelace' -> 'A.L.'",
     lambda n: "".join(w[0].upper() + "." for w in n.split()), ["ada lovelace", "Guido van Rossum", ""])
task("alternate_case", "s", "returns the string `s` with its characters alternately upper- and lowercase, starting with uppercase at index 0",
     lambda s: "".join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(s)), ["hello", "", "ABCDEF"])
task("most_common_char", "s", "returns the character that occurs most often in the non-empty string `s`, the one that appears first in `s` on a tie",
     lambda s: max(s, key=lambda c: (s.count(c), -s.index(c))), ["banana", "abc", "zzyy"])
task("word_lengths", "s", "returns the list of the lengths of the space-separated words of the string `s`",
     lambda s: [len(w) for w in s.split()], ["the quick fox", "", "a"])
task("is_valid_identifier_start", "s", "returns True when the non-empty string `s` starts with a letter or an underscore, else False",
     lambda s: s[0].isalpha() or s[0] == "_", ["_x", "9a", "abc", "-"])
task("strip_punctuation", "s", "returns the string `s` without the ASCII punctuation characters of string.punctuation",
     lambda s: "".join(c for c in s if c not in string.punctuation), ["Hello, world!", "", "a.b-c"])
task("balance_of_brackets_square", "s", "returns True when the square brackets '[' and ']' in the string `s` are balanced (every ']' closes an earlier '['), else False",
     lambda s: _balanced(s, "[", "]"), ["[]", "[[]]", "][", "[[]", "a[b]c"])
task("balance_of_braces", "s", "returns True when the curly braces '{' and '}' in the string `s` are balanced (every '}' closes an earlier '{'), else False",
     lambda s: _balanced(s, "{", "}"), ["{}", "{{}}", "}{", "{{}", "x{y}z"])



# --- dictionaries ---------------------------------------------------------------------------
task("invert_dict", "d", "returns a dictionary mapping each value of the dictionary `d` to its key (the values are distinct)",
     lambda d: {v: k for k, v in d.items()}, [{"a": 1, "b": 2}, {}, {1: "x"}])
task("merge_dicts_sum", "a, b", "merges the dictionaries `a` and `b` of numbers into a new one, adding the values of keys present in both",
     lambda a, b: {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}, [({"x": 1}, {"x": 2, "y": 3}), ({}, {}), ({"a": 1}, {})])
task("group_by_length", "words", "returns a dictionary mapping each word length to the list of words of `words` with that length, in their original order",
     lambda ws: {n: [w for w in ws if len(w) == n] for n in sorted({len(w) for w in ws})}, [["a", "bb", "c", "dd", "eee"], []])
task("group_by_first_letter", "words", "returns a dictionary mapping each first letter to the list of words of `words` starting with it, in their original order",
     lambda ws: {c: [w for w in ws if w[0] == c] for c in dict.fromkeys(w[0] for w in ws)}, [["apple", "avocado", "banana"], []])
task("keys_with_max_value", "d", "returns the sorted list of the keys of the non-empty dictionary `d` whose value is the largest",
     lambda d: sorted(k for k, v in d.items() if v == max(d.values())), [{"a": 1, "b": 3, "c": 3}, {"x": 0}])
task("filter_dict_by_value", "d, threshold", "returns a new dictionary with only the items of `d` whose value is at least `threshold`",
     lambda d, t: {k: v for k, v in d.items() if v >= t}, [({"a": 1, "b": 5}, 3), ({}, 0), ({"c": 2}, 2)])
task("count_words_dict", "s", "returns a dictionary mapping each lowercase word of the string `s` (split on whitespace) to how many times it occurs",
     lambda s: {w: s.lower().split().count(w) for w in s.lower().split()}, ["the cat the hat", "", "A a"])
task("sum_dict_values", "d", "returns the sum of the values of the dictionary `d` of numbers",
     lambda d: sum(d.values()), [{"a": 1, "b": 2}, {}, {"x": -5}])
task("sorted_keys_by_value", "d", "returns the keys of the dictionary `d` sorted by their values in increasing order (by key on a tie)",
     lambda d: sorted(d, key=lambda k: (d[k], k)), [{"b": 2, "a": 2, "c": 1}, {}])
task("nested_get", "d, path", "follows the list of keys `path` through the nested dictionaries starting at `d` and returns the value found, or None when a key is missing",
     lambda d, p: _nested_get(d, p), [({"a": {"b": 1}}, ["a", "b"]), ({"a": 1}, ["b"]), ({}, [])])



# --- more parameterised families ------------------------------------------------------------
for k in (3, 4, 5, 6):
    task(f"count_words_longer_than_{k}", "s", f"returns how many space-separated words of the string `s` have more than {k} characters",
         lambda s, k=k: sum(1 for w in s.split() if len(w) > k), ["", "a bb ccc dddd eeeee ffffff", "internationalisation is long"])
for a, b in (("a", "o"), ("e", "3"), ("l", "1"), (".", "!")):
    task(f"replace_{'dot' if a == '.' else a}_with_{'bang' if b == '!' else b}", "s", f"returns the string `s` with every {a!r} replaced by {b!r}",
         lambda s, a=a, b=b: s.replace(a, b), ["", "banana.", "hello level. ok"])
for k in (2, 3):
    task(f"top_{k}_largest", "xs", f"returns the {k} largest numbers of the list `xs` (which has at least {k}) in decreasing order",
         lambda xs, k=k: sorted(xs, reverse=True)[:k], [[5, 1, 9, 3, 7], [2, 2, 2, 2], list(range(k))])
    task(f"every_{k}th_element", "xs", f"returns the elements of the list `xs` at indices 0, {k}, {2 * k}, ...",
         lambda xs, k=k: xs[::k], [[], list(range(10)), ["a", "b"]])
for k in (5, 10, 100):
    task(f"round_to_nearest_{k}", "n", f"rounds the integer `n` to the nearest multiple of {k}, rounding halves up",
         lambda n, k=k: (n + k // 2) // k * k, [0, k // 2, k - 1, 3 * k + 1, -k])
    task(f"next_multiple_of_{k}", "n", f"returns the smallest multiple of {k} that is greater than or equal to the integer `n`",
         lambda n, k=k: -(-n // k) * k, [0, 1, k, k + 1, -1])
for k in (1, 2, 3):
    task(f"first_{k}_words", "s", f"returns the first {k} space-separated words of the string `s` joined by single spaces (all of them if there are fewer)",
         lambda s, k=k: " ".join(s.split()[:k]), ["", "one two three four", "solo"])
for name, f, desc in (
    ("celsius_to_kelvin", lambda c: c + 273.15, "converts a temperature `c` in degrees Celsius to kelvins"),
    ("fahrenheit_to_celsius", lambda f: (f - 32) * 5 / 9, "converts a temperature `f` in degrees Fahrenheit to degrees Celsius"),
    ("inches_to_cm", lambda x: x * 2.54, "converts a length `x` in inches to centimetres (1 inch = 2.54 cm)"),
    ("kg_to_pounds", lambda x: x * 2.20462, "converts a mass `x` in kilograms to pounds, with 1 kg = 2.20462 lb"),
    ("cube_volume", lambda a: a ** 3, "returns the volume of a cube with edge length `a`"),
    ("sphere_volume", lambda r: 4 / 3 * math.pi * r ** 3, "returns the volume of a sphere of radius `r`, using math.pi"),
    ("cylinder_volume", lambda r: math.pi * r * r * 2, "returns the volume of a cylinder of radius `r` and height 2, using math.pi"),
):
    task(name, name.split("_")[0][0], desc, f, [0, 1, 2.5, 10], compare="approx")
task("rectangle_perimeter", "w, h", "returns the perimeter of a rectangle of width `w` and height `h`",
     lambda w, h: 2 * (w + h), [(1, 2), (0, 0), (2.5, 4)], compare="approx")
task("percent_of", "part, whole", "returns what percentage `part` is of `whole` (a positive number), as a float",
     lambda a, b: 100 * a / b, [(1, 4), (0, 5), (3, 3)], compare="approx")
task("average_word_length", "s", "returns the mean length of the space-separated words of the string `s`, or 0.0 when it has none",
     lambda s: sum(map(len, s.split())) / len(s.split()) if s.split() else 0.0, ["", "a bb ccc", "hello"], compare="approx")
task("collapse_adjacent_duplicates", "xs", "returns the list `xs` with each run of equal adjacent elements collapsed into one element",
     lambda xs: [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x], [[], [1, 1, 2, 2, 2, 1], ["a", "a"]])
task("sort_words_by_length", "words", "returns the list of strings `words` sorted by length, keeping the original order of words of equal length",
     lambda ws: sorted(ws, key=len), [["ccc", "a", "bb", "d"], []])
task("sort_pairs_by_second", "pairs", "returns the list of tuples `pairs` sorted by their second element (stable)",
     lambda ps: sorted(ps, key=lambda p: p[1]), [[(1, "b"), (2, "a"), (3, "b")], [], [(5, 0)]])
task("unique_sorted_descending", "xs", "returns the distinct values of the list `xs` sorted from largest to smallest",
     lambda xs: sorted(set(xs), reverse=True), [[3, 1, 3, 2], [], [5, 5]])
task("binary_gap", "n", "returns the length of the longest run of 0 bits surrounded by 1 bits in the binary representation of the positive integer `n`",
     lambda n: max((len(g) for g in bin(n)[2:].strip("0").split("1")), default=0), [9, 529, 20, 15, 32, 1041])
task("hamming_distance", "a, b", "returns the number of positions at which the equal-length strings `a` and `b` differ",
     lambda a, b: sum(x != y for x, y in zip(a, b)), [("karolin", "kathrin"), ("", ""), ("abc", "abc")])
task("is_subsequence", "a, b", "returns True when the characters of the string `a` appear in the string `b` in the same order (not necessarily adjacent), else False",
     lambda a, b: _is_subseq(a, b), [("ace", "abcde"), ("aec", "abcde"), ("", "x"), ("x", "")])
task("digits_to_words", "s", "returns the English words of the digits of the string `s` of digits, separated by spaces, for example '12' -> 'one two'",
     lambda s: " ".join("zero one two three four five six seven eight nine".split()[int(c)] for c in s), ["12", "", "907"])
task("roman_to_integer", "s", "returns the integer value of the Roman numeral `s` (I, V, X, L, C, D, M, with subtractive pairs such as IV and XC)",
     lambda s: _roman(s), ["III", "IV", "IX", "LVIII", "MCMXCIV"])
task("matrix_row_sums", "m", "returns the list of the sums of each row of the matrix `m` (a list of rows)",
     lambda m: [sum(r) for r in m], [[[1, 2], [3, 4]], [], [[5]]])
task("matrix_column_sums", "m", "returns the list of the sums of each column of the non-empty matrix `m` (a list of equal-length rows)",
     lambda m: [sum(c) for c in zip(*m)], [[[1, 2], [3, 4]], [[5, 6, 7]]])
task("identity_matrix", "n", "returns the n-by-n identity matrix as a list of rows of integers",
     lambda n: [[int(i == j) for j in range(n)] for i in range(n)], [0, 1, 3])
task("count_pairs_with_sum", "xs, target", "returns how many pairs of positions i < j of the list `xs` have xs[i] + xs[j] == `target`",
     lambda xs, t: sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] + xs[j] == t), [([1, 2, 3, 4], 5), ([], 0), ([2, 2, 2], 4)])
task("majority_element", "xs", "returns the value that occurs in more than half of the positions of the list `xs`, or None when there is none",
     lambda xs: next((x for x in set(xs) if xs.count(x) * 2 > len(xs)), None), [[1, 1, 2], [1, 2], [], [3, 3, 3, 1]])
task("gray_code", "n", "returns the Gray code of the non-negative integer `n`, that is n XOR (n shifted right by one bit)",
     lambda n: n ^ (n >> 1), [0, 1, 2, 3, 7, 100])
task("list_of_squares", "n", "returns the list of the squares of 1, 2, ..., n for a non-negative integer `n`",
     lambda n: [i * i for i in range(1, n + 1)], [0, 1, 5])
task("list_of_cubes", "n", "returns the list of the cubes of 1, 2, ..., n for a non-negative integer `n`",
     lambda n: [i ** 3 for i in range(1, n + 1)], [0, 1, 4])
task("pig_latin_word", "word", "returns the Pig Latin form of a lowercase word: a word starting with a vowel gets 'way' appended; otherwise its leading consonants move to the end, followed by 'ay'",
     lambda w: w + "way" if w[0] in "aeiou" else (lambda i: w[i:] + w[:i] + "ay")(next((i for i, c in enumerate(w) if c in "aeiou"), len(w))), ["apple", "banana", "string", "rhythm"])
task("longest_common_suffix", "a, b", "returns the longest string that both `a` and `b` end with",
     lambda a, b: a[len(a) - next((i for i in range(min(len(a), len(b))) if a[-1 - i] != b[-1 - i]), min(len(a), len(b))):], [("walking", "talking"), ("abc", "xyz"), ("", "a")])
task("starts_with_vowel", "s", "returns True when the string `s` starts with a vowel letter (a, e, i, o, u, in either case), else False",
     lambda s: bool(s) and s[0].lower() in "aeiou", ["apple", "Egg", "banana", ""])
task("count_capitalised_words", "s", "returns how many space-separated words of the string `s` start with an uppercase letter",
     lambda s: sum(1 for w in s.split() if w[0].isupper()), ["Hello World and friends", "", "lower case"])
task("sum_of_digit_strings", "xs", "returns the sum of the integers written in the list of digit strings `xs`",
     lambda xs: sum(int(x) for x in xs), [["1", "22", "333"], [], ["0"]])
task("longest_string_length", "xs", "returns the length of the longest string in the list `xs` (0 for an empty list)",
     lambda xs: max(map(len, xs), default=0), [["a", "abc", "ab"], [], [""]])
task("count_true", "xs", "returns how many elements of the list `xs` are truthy",
     lambda xs: sum(1 for x in xs if x), [[True, False, 1, 0, "a", ""], []])
task("dedupe_case_insensitive", "words", "returns the words of `words` without the ones that repeat an earlier word ignoring case, in their original order",
     lambda ws: [w for i, w in enumerate(ws) if w.lower() not in {v.lower() for v in ws[:i]}], [["Apple", "apple", "Banana", "APPLE", "cherry"], []])
for sep, word in ((",", "comma"), (";", "semicolon"), ("|", "pipe")):
    task(f"split_on_{word}", "s", f"splits the string `s` on {sep!r}, strips spaces around each part, and returns the list of non-empty parts",
         lambda s, sep=sep: [x.strip() for x in s.split(sep) if x.strip()], ["", f"a{sep} b {sep}{sep}c", "single"])
    task(f"join_with_{word}", "xs", f"returns the strings of the list `xs` joined with {sep!r}",
         lambda xs, sep=sep: sep.join(xs), [[], ["a"], ["a", "b", "c"]])
for k in (2, 3, 10):
    task(f"digits_in_base_{k}_sum", "n", f"returns the sum of the digits of the non-negative integer `n` written in base {k}",
         lambda n, k=k: sum(int(d) for d in _base(n, k)), [0, 5, 17, 255])


def similarity(a, b):
    wa, wb = re.findall(r"[a-z0-9]+", a.lower()), re.findall(r"[a-z0-9]+", b.lower())
    return difflib.SequenceMatcher(None, wa, wb).ratio()


def humaneval_docstring(prompt):
    m = re.findall(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', prompt, re.S)
    return " ".join(a or b for a, b in m) or prompt


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--humaneval", help="HumanEval.jsonl (scripts/fetch-humaneval.sh) to check against")
    args = ap.parse_args()
    ids = [t[0] for t in TASKS]
    assert len(ids) == len(set(ids)), "task ids must be distinct"
    for tid, entry, _, t in TASKS:
        for line in t:
            ast.parse(line)
            assert f"{entry}(" in line, (tid, line)
    train, val, tests = [], [], []
    for tid, entry, desc, t in TASKS:
        h = int(hashlib.sha256(tid.encode()).hexdigest(), 16) % 1000
        (val if h < VAL_FRACTION * 1000 else train).append({"id": tid, "prompt": desc + SUFFIX})
        tests.append({"id": tid, "entry_point": entry, "tests": t})
    check = {"tasks": len(TASKS), "train": len(train), "val": len(val), "threshold": THRESHOLD}
    if args.humaneval:
        he = [json.loads(l) for l in open(args.humaneval)]
        names = {p["entry_point"] for p in he}
        clash = sorted(names & {t[1] for t in TASKS})
        assert not clash, f"function names shared with HumanEval: {clash}"
        pairs = []
        for tid, _, desc, _ in TASKS:
            best = max(((similarity(desc, humaneval_docstring(p["prompt"])), p["task_id"]) for p in he))
            pairs.append((best[0], tid, best[1]))
        pairs.sort(reverse=True)
        over = [p for p in pairs if p[0] >= THRESHOLD]
        assert not over, f"tasks too close to HumanEval (word similarity >= {THRESHOLD}): {over}"
        check["humaneval_problems"] = len(he)
        check["shared_function_names"] = 0
        check["nearest"] = [{"task": t, "humaneval": h, "similarity": round(s, 3)} for s, t, h in pairs[:5]]
    for name, rows in (("train.jsonl", train), ("val.jsonl", val), ("tests.jsonl", tests)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(json.dumps(check, indent=2))


if __name__ == "__main__":
    main()
