"""deepaudit.pipeline"""
