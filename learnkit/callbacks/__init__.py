"Callbacks: the defaults the loop relies on, schedules, and the optional ones."
