"""deepaudit.jobs"""
